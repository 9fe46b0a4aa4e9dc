//! Configuration of a control node: a TOML file (`--config`), overridden by flags.
//!
//! ```toml
//! node_id = 1
//! listen = "127.0.0.1:7001"
//! data_dir = "/var/lib/blixard-control"
//! initial_cluster = "1=http://127.0.0.1:7001,2=http://127.0.0.1:7002,3=http://127.0.0.1:7003"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Every setting, each optional: what a file or the flags say.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This node's Raft id (a positive integer, unique in the cluster).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Address the HTTP API and Raft RPC listen on.
    #[arg(long)]
    pub listen: Option<String>,
    /// URL peers and clients use to reach this node (default: http://LISTEN).
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Directory for raft-log.db and state.db.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The cluster's first members, `ID=URL,ID=URL,…`, the same on every node.
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Join an existing cluster (added with `cluster add`) instead of forming one.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(default)]
    pub join: Option<bool>,
    /// Take a snapshot and compact the log every this many entries.
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Raft heartbeat interval in milliseconds (default 50).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Raft election timeout range (min) in milliseconds (default 250).
    #[arg(long)]
    pub election_timeout_min_ms: Option<u64>,
    /// Raft election timeout range (max) in milliseconds (default 500; it is also
    /// openraft's leader lease, so it bounds how fast a dead leader is replaced).
    #[arg(long)]
    pub election_timeout_max_ms: Option<u64>,
    /// How long a host whose agent reports no fence timing (an agent from before leases)
    /// may be silent before it is declared down and its VMs are moved (default 3000). Hosts
    /// that report their timing get `lease_ms + grace_ms + host_lease_margin_ms` instead.
    #[arg(long)]
    pub host_ttl_ms: Option<u64>,
    /// Added to an agent's lease and fence grace before its host is declared down (default
    /// 500): covers clock-rate drift, the dead man's switch's polling and signal delivery.
    #[arg(long)]
    pub host_lease_margin_ms: Option<u64>,
    /// File of operator bearer tokens, one per line (turns authentication on).
    #[arg(long)]
    pub operator_token_file: Option<PathBuf>,
    /// File of agent tokens, `HOST_ID TOKEN` per line.
    #[arg(long)]
    pub agent_token_file: Option<PathBuf>,
    /// File holding the token control nodes present to each other.
    #[arg(long)]
    pub peer_token_file: Option<PathBuf>,
    /// Serve /metrics without a token.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_open: Option<bool>,
    /// Allow no authentication and plain HTTP on a non-loopback address.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// TLS certificate (PEM chain) for the API and Raft traffic.
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM) for the certificate.
    #[arg(long)]
    pub tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) that peers' certificates are checked against.
    #[arg(long)]
    pub tls_ca_file: Option<PathBuf>,
    /// Let `POST /raft/faults` cut this node off from chosen peers (for fault-injection tests).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub fault_injection: Option<bool>,
    /// API requests per second each client (token, or address when unauthenticated) may
    /// make on this node; 0 turns the limit off. Default 10000.
    #[arg(long)]
    pub rate_limit_per_sec: Option<u32>,
    /// Requests a client may make at once above its rate. Default twice the rate.
    #[arg(long)]
    pub rate_limit_burst: Option<u32>,
    /// Seconds a finished task (its VM and result) is kept before the leader deletes it
    /// (default 86400).
    #[arg(long)]
    pub task_retention_secs: Option<u64>,
}

impl Settings {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: p, source })
    }

    /// `self` with every setting that `over` has replaced by it.
    pub fn overridden_by(self, over: Settings) -> Settings {
        Settings {
            node_id: over.node_id.or(self.node_id),
            listen: over.listen.or(self.listen),
            advertise_url: over.advertise_url.or(self.advertise_url),
            data_dir: over.data_dir.or(self.data_dir),
            initial_cluster: over.initial_cluster.or(self.initial_cluster),
            join: over.join.or(self.join),
            snapshot_every: over.snapshot_every.or(self.snapshot_every),
            heartbeat_ms: over.heartbeat_ms.or(self.heartbeat_ms),
            election_timeout_min_ms: over
                .election_timeout_min_ms
                .or(self.election_timeout_min_ms),
            election_timeout_max_ms: over
                .election_timeout_max_ms
                .or(self.election_timeout_max_ms),
            host_ttl_ms: over.host_ttl_ms.or(self.host_ttl_ms),
            host_lease_margin_ms: over.host_lease_margin_ms.or(self.host_lease_margin_ms),
            operator_token_file: over.operator_token_file.or(self.operator_token_file),
            agent_token_file: over.agent_token_file.or(self.agent_token_file),
            peer_token_file: over.peer_token_file.or(self.peer_token_file),
            metrics_open: over.metrics_open.or(self.metrics_open),
            insecure: over.insecure.or(self.insecure),
            tls_cert_file: over.tls_cert_file.or(self.tls_cert_file),
            tls_key_file: over.tls_key_file.or(self.tls_key_file),
            tls_ca_file: over.tls_ca_file.or(self.tls_ca_file),
            fault_injection: over.fault_injection.or(self.fault_injection),
            rate_limit_per_sec: over.rate_limit_per_sec.or(self.rate_limit_per_sec),
            rate_limit_burst: over.rate_limit_burst.or(self.rate_limit_burst),
            task_retention_secs: over.task_retention_secs.or(self.task_retention_secs),
        }
    }
}

/// A checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node_id: u64,
    pub listen: SocketAddr,
    pub advertise_url: String,
    pub data_dir: PathBuf,
    pub initial_cluster: BTreeMap<u64, String>,
    pub join: bool,
    pub snapshot_every: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub host_ttl_ms: u64,
    pub host_lease_margin_ms: u64,
    pub auth: Option<AuthFiles>,
    pub metrics_open: bool,
    pub tls: Option<TlsFiles>,
    /// Whether `POST /raft/faults` is served (tests only).
    pub fault_injection: bool,
    /// Per-client API rate limit; `None` when off.
    pub rate_limit: Option<RateLimit>,
    /// How long a finished task is kept, in ms.
    pub task_retention_ms: u64,
}

/// A per-client request rate: `per_sec` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_sec: NonZeroU32,
    pub burst: NonZeroU32,
}

/// Default rate limit: far above what the benchmark or an agent fleet sends one node from one
/// client, so it only stops floods.
pub const DEFAULT_RATE_LIMIT_PER_SEC: u32 = 10_000;

/// Where the tokens are.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthFiles {
    pub operators: PathBuf,
    pub agents: Option<PathBuf>,
    pub peer: PathBuf,
}

/// Where the certificate, its key and the CA are.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Parses `1=http://a:1,2=http://b:2`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, url) = part
            .split_once('=')
            .ok_or_else(|| invalid("initial_cluster", format!("{part:?} is not ID=URL")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| invalid("initial_cluster", format!("{id:?} is not a node id")))?;
        if id == 0 {
            return Err(invalid("initial_cluster", "node ids start at 1"));
        }
        let url = url.trim().trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "initial_cluster",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
        if out.insert(id, url.to_string()).is_some() {
            return Err(invalid(
                "initial_cluster",
                format!("node {id} is listed twice"),
            ));
        }
    }
    Ok(out)
}

impl Config {
    /// Checks settings and fills in defaults.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let node_id = s.node_id.ok_or_else(|| invalid("node_id", "is required"))?;
        if node_id == 0 {
            return Err(invalid("node_id", "must be a positive integer"));
        }
        let listen_s = s.listen.unwrap_or_else(|| "127.0.0.1:7001".into());
        let listen: SocketAddr = listen_s.parse().map_err(|_| {
            invalid(
                "listen",
                format!("{listen_s:?} is not an address like 127.0.0.1:7001"),
            )
        })?;
        let scheme = if s.tls_cert_file.is_some() {
            "https"
        } else {
            "http"
        };
        let advertise_url = s
            .advertise_url
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("{scheme}://{listen}"));
        if !(advertise_url.starts_with("http://") || advertise_url.starts_with("https://")) {
            return Err(invalid("advertise_url", "must be an http(s) URL"));
        }
        let join = s.join.unwrap_or(false);
        let initial_cluster = match &s.initial_cluster {
            Some(ic) => parse_initial_cluster(ic)?,
            None => BTreeMap::new(),
        };
        if !join {
            if initial_cluster.is_empty() {
                return Err(invalid("initial_cluster", "is required unless join = true"));
            }
            if !initial_cluster.contains_key(&node_id) {
                return Err(invalid(
                    "initial_cluster",
                    format!("does not list this node ({node_id})"),
                ));
            }
        }
        let heartbeat_ms = s.heartbeat_ms.unwrap_or(50);
        let election_timeout_min_ms = s.election_timeout_min_ms.unwrap_or(250);
        let election_timeout_max_ms = s.election_timeout_max_ms.unwrap_or(500);
        if heartbeat_ms == 0 || election_timeout_min_ms < 2 * heartbeat_ms {
            return Err(invalid(
                "election_timeout_min_ms",
                "must be at least twice heartbeat_ms (and heartbeat_ms positive)",
            ));
        }
        if election_timeout_max_ms <= election_timeout_min_ms {
            return Err(invalid(
                "election_timeout_max_ms",
                "must be above election_timeout_min_ms",
            ));
        }
        let host_ttl_ms = s.host_ttl_ms.unwrap_or(3_000);
        if !(1_000..=3_600_000).contains(&host_ttl_ms) {
            return Err(invalid("host_ttl_ms", "must be between 1000 and 3600000"));
        }
        let host_lease_margin_ms = s.host_lease_margin_ms.unwrap_or(500);
        if !(100..=60_000).contains(&host_lease_margin_ms) {
            return Err(invalid(
                "host_lease_margin_ms",
                "must be between 100 and 60000",
            ));
        }
        let auth = match (s.operator_token_file, s.peer_token_file) {
            (Some(operators), Some(peer)) => Some(AuthFiles {
                operators,
                agents: s.agent_token_file,
                peer,
            }),
            (None, None) if s.agent_token_file.is_none() => None,
            _ => {
                return Err(invalid(
                    "operator_token_file",
                    "authentication needs both operator_token_file and peer_token_file",
                ))
            }
        };
        let tls = match (s.tls_cert_file, s.tls_key_file, s.tls_ca_file) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
            (None, None, None) => None,
            _ => {
                return Err(invalid(
                    "tls_cert_file",
                    "TLS needs tls_cert_file, tls_key_file and tls_ca_file together",
                ))
            }
        };
        let insecure = s.insecure.unwrap_or(false);
        let local = listen.ip().is_loopback();
        if (auth.is_none() || tls.is_none()) && !local && !insecure {
            return Err(invalid(
                "listen",
                format!(
                    "{listen} is reachable from other machines: configure tokens and TLS, \
                     or set insecure = true to allow plain, unauthenticated HTTP"
                ),
            ));
        }
        if tls.is_some() != advertise_url.starts_with("https://") {
            return Err(invalid(
                "advertise_url",
                "must be https:// exactly when TLS is configured",
            ));
        }
        let snapshot_every = s.snapshot_every.unwrap_or(10_000);
        if snapshot_every < 10 {
            return Err(invalid("snapshot_every", "must be at least 10"));
        }
        let per_sec = s.rate_limit_per_sec.unwrap_or(DEFAULT_RATE_LIMIT_PER_SEC);
        let rate_limit = match NonZeroU32::new(per_sec) {
            None => None,
            Some(per_sec) => {
                let burst = s
                    .rate_limit_burst
                    .unwrap_or_else(|| per_sec.get().saturating_mul(2));
                let burst = NonZeroU32::new(burst).ok_or_else(|| {
                    invalid("rate_limit_burst", "must be positive when a rate is set")
                })?;
                Some(RateLimit { per_sec, burst })
            }
        };
        let task_retention_secs = s.task_retention_secs.unwrap_or(86_400);
        if !(1..=365 * 86_400).contains(&task_retention_secs) {
            return Err(invalid(
                "task_retention_secs",
                "must be between 1 and 31536000",
            ));
        }
        Ok(Config {
            node_id,
            listen,
            advertise_url,
            data_dir: s
                .data_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/blixard-control")),
            initial_cluster,
            join,
            snapshot_every,
            heartbeat_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            host_ttl_ms,
            host_lease_margin_ms,
            auth,
            metrics_open: s.metrics_open.unwrap_or(false),
            tls,
            fault_injection: s.fault_injection.unwrap_or(false),
            rate_limit,
            task_retention_ms: task_retention_secs * 1000,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ic: &str) -> Settings {
        Settings {
            node_id: Some(1),
            initial_cluster: Some(ic.into()),
            ..Default::default()
        }
    }

    #[test]
    fn initial_cluster_parsing() {
        let ok = parse_initial_cluster("1=http://127.0.0.1:7001, 2=http://127.0.0.1:7002/");
        assert_eq!(
            ok.ok(),
            Some(BTreeMap::from([
                (1, "http://127.0.0.1:7001".to_string()),
                (2, "http://127.0.0.1:7002".to_string())
            ]))
        );
        for bad in [
            "1",
            "x=http://a",
            "0=http://a",
            "1=ftp://a",
            "1=http://a,1=http://b",
        ] {
            assert!(parse_initial_cluster(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks() {
        assert!(Config::from_settings(settings("1=http://127.0.0.1:7001")).is_ok());
        assert!(Config::from_settings(settings("2=http://127.0.0.1:7002")).is_err());
        assert!(Config::from_settings(Settings {
            node_id: Some(1),
            ..Default::default()
        })
        .is_err());
        let join = Settings {
            node_id: Some(4),
            join: Some(true),
            ..Default::default()
        };
        assert!(Config::from_settings(join).is_ok());
        let mut s = settings("1=http://127.0.0.1:7001");
        s.listen = Some("nope".into());
        assert!(Config::from_settings(s).is_err());
        let mut s = settings("1=http://127.0.0.1:7001");
        s.snapshot_every = Some(1);
        assert!(Config::from_settings(s).is_err());
    }

    #[test]
    fn exposure_needs_tokens_and_tls_or_insecure() {
        let exposed = |f: fn(&mut Settings)| {
            let mut s = settings("1=http://10.0.0.1:7001");
            s.listen = Some("0.0.0.0:7001".into());
            f(&mut s);
            Config::from_settings(s)
        };
        assert!(exposed(|_| {}).is_err());
        assert!(exposed(|s| s.insecure = Some(true)).is_ok());
        assert!(exposed(|s| {
            s.operator_token_file = Some("/o".into());
            s.peer_token_file = Some("/p".into());
        })
        .is_err());
        let full = exposed(|s| {
            s.operator_token_file = Some("/o".into());
            s.peer_token_file = Some("/p".into());
            s.tls_cert_file = Some("/c".into());
            s.tls_key_file = Some("/k".into());
            s.tls_ca_file = Some("/ca".into());
        });
        assert!(
            full.as_ref()
                .is_ok_and(|c| c.advertise_url == "https://0.0.0.0:7001"),
            "{full:?}"
        );
        assert!(exposed(|s| s.operator_token_file = Some("/o".into())).is_err());
        assert!(exposed(|s| {
            s.insecure = Some(true);
            s.tls_cert_file = Some("/c".into());
        })
        .is_err());
    }

    #[test]
    fn file_overrides_and_unknown_keys() {
        let file: Settings =
            toml::from_str("node_id = 1\ninitial_cluster = \"1=http://127.0.0.1:7001\"\n")
                .unwrap_or_default();
        let merged = file.overridden_by(Settings {
            listen: Some("127.0.0.1:9".into()),
            ..Default::default()
        });
        assert_eq!(merged.node_id, Some(1));
        assert_eq!(merged.listen.as_deref(), Some("127.0.0.1:9"));
        assert!(toml::from_str::<Settings>("nod_id = 1").is_err());
    }

    #[test]
    fn rate_limits() {
        let limit = |toml_extra: &str| {
            let text =
                format!("node_id = 1\ninitial_cluster = \"1=http://127.0.0.1:7001\"\n{toml_extra}");
            let file: Settings = toml::from_str(&text).unwrap_or_default();
            Config::from_settings(file)
                .map(|c| c.rate_limit.map(|r| (r.per_sec.get(), r.burst.get())))
        };
        // (TOML, Some(limit) if accepted, limit as (rate, burst) or None when off)
        type Case = (&'static str, Option<Option<(u32, u32)>>);
        let cases: &[Case] = &[
            (
                "",
                Some(Some((
                    DEFAULT_RATE_LIMIT_PER_SEC,
                    2 * DEFAULT_RATE_LIMIT_PER_SEC,
                ))),
            ),
            ("rate_limit_per_sec = 5", Some(Some((5, 10)))),
            (
                "rate_limit_per_sec = 5\nrate_limit_burst = 7",
                Some(Some((5, 7))),
            ),
            ("rate_limit_per_sec = 0", Some(None)),
            ("rate_limit_per_sec = 0\nrate_limit_burst = 0", Some(None)),
            ("rate_limit_per_sec = 5\nrate_limit_burst = 0", None),
            (
                "rate_limit_per_sec = 4294967295",
                Some(Some((u32::MAX, u32::MAX))),
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(limit(extra).ok(), *want, "{extra}");
        }
    }

    #[test]
    fn fault_injection_is_off_unless_asked() {
        let off = Config::from_settings(settings("1=http://127.0.0.1:7001"));
        assert!(off.is_ok_and(|c| !c.fault_injection));
        let file: Settings = toml::from_str(
            "node_id = 1\ninitial_cluster = \"1=http://127.0.0.1:7001\"\nfault_injection = true\n",
        )
        .unwrap_or_default();
        assert!(Config::from_settings(file).is_ok_and(|c| c.fault_injection));
    }
}
