//! The agent's configuration: a TOML file (`--config FILE`, usually
//! `/etc/blixard/agent.toml`) whose settings command-line flags may override.
//!
//! Loading is separate from validation so that `blixard-agent check-config FILE` can report
//! the first problem in one line without starting anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blixard_api::{validate, Hypervisor};
use serde::{Deserialize, Serialize};

/// Errors of loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A setting has a value the agent cannot use.
    #[error("invalid setting {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Which D-Bus bus reaches the systemd manager the agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SystemdBus {
    /// The system bus: the system manager (production).
    #[default]
    System,
    /// The session bus of `$DBUS_SESSION_BUS_ADDRESS`: a user manager (tests, rootless use).
    Session,
}

impl SystemdBus {
    pub fn as_str(self) -> &'static str {
        match self {
            SystemdBus::System => "system",
            SystemdBus::Session => "session",
        }
    }
}

impl std::str::FromStr for SystemdBus {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "system" => Ok(SystemdBus::System),
            "session" => Ok(SystemdBus::Session),
            other => Err(invalid(
                "systemd_bus",
                format!("{other:?} is not \"system\" or \"session\""),
            )),
        }
    }
}

/// The whole configuration. Every key but `host_id` and `control_endpoints` has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// DNS label naming this host in the cluster.
    #[serde(default)]
    pub host_id: String,
    /// Control-plane endpoints (`http://host:port`); any node will do.
    #[serde(default)]
    pub control_endpoints: Vec<String>,
    /// Where the agent keeps its files; the disk capacity reported is this file system's.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Per-boot files (sockets, pid files of VMs).
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// Kernels, initrds and disk images; every path of a VM spec is resolved inside it.
    #[serde(default = "default_image_dir")]
    pub image_dir: PathBuf,
    #[serde(default)]
    pub systemd_bus: SystemdBus,
    /// Labels the scheduler matches against VM constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// How long a heartbeat a leader confirmed keeps the host's lease, counted from when the
    /// heartbeat was sent. Once it runs out with no newer confirmation, the agent fences: it
    /// stops every `on_host_loss = move` VM on the host (SIGTERM, then SIGKILL after
    /// `fence_grace_ms`), and so does the dead man's switch (`blixard-fence.service`) if the
    /// agent is not alive to do it. At least twice `heartbeat_interval_ms`; 2000 when unset
    /// (see [`Config::lease_ms`]).
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// How long a fenced VM gets between SIGTERM and SIGKILL.
    #[serde(default = "default_fence_grace_ms")]
    pub fence_grace_ms: u64,
    /// Deprecated alias of `lease_ms` (fencing used to be opt-in); `lease_ms` wins if both
    /// are set.
    #[serde(default, skip_serializing)]
    pub fence_after_ms: Option<u64>,
    /// The argv that runs a VM of hypervisor `process` (absolute path first); when absent,
    /// this host does not offer that hypervisor.
    #[serde(default)]
    pub process_command: Option<Vec<String>>,
    /// Hypervisor name (`qemu`, `cloud-hypervisor`, `firecracker`) → binary path.
    #[serde(default)]
    pub hypervisors: BTreeMap<String, PathBuf>,
    /// QEMU's machine type: `microvm` (default) or the `q35` fallback.
    #[serde(default)]
    pub qemu_machine: crate::hypervisor::QemuMachine,
    /// Memory kept for the host itself, subtracted from MemTotal in the capacity.
    #[serde(default = "default_memory_reserve_mib")]
    pub memory_reserve_mib: u64,
    /// File holding a bearer token for the control plane (e.g. from `LoadCredential=`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM bundle of the CA that signed the control plane's certificates: with `https://`
    /// endpoints the agent trusts exactly these (and nothing else).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Address reported in the registration, for operators; may be empty.
    #[serde(default)]
    pub advertise_address: String,
    /// Bridges a VM's NICs may join (as tap devices); a spec naming another is refused.
    #[serde(default)]
    pub bridges: Vec<String>,
    /// The `ip` binary (iproute2) that creates and deletes the tap devices.
    #[serde(default = "default_ip")]
    pub ip: PathBuf,
    /// `journalctl`, run to read why a QEMU VM ended (a guest panic, QEMU's own error).
    #[serde(default = "default_journalctl")]
    pub journalctl: PathBuf,
    /// Forces the KVM capability instead of probing `/dev/kvm`.
    #[serde(default)]
    pub kvm: Option<bool>,
    /// Limits and timeouts of every VM unit.
    #[serde(default)]
    pub vm_unit: VmUnitConfig,
    /// Where the agent's own API (the VMs' logs, for the control plane) listens, e.g.
    /// `10.0.0.5:7101` or `127.0.0.1:0`; its URL goes into the registration. Absent: no API,
    /// and `blixardctl vm logs` cannot reach this host. Without `token_file`, loopback only.
    #[serde(default)]
    pub api_listen: Option<String>,
    /// PEM certificate chain and key of the agent API: with both, it serves HTTPS (control
    /// nodes check it against the cluster's CA).
    #[serde(default)]
    pub api_tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub api_tls_key_file: Option<PathBuf>,
}

/// Settings of the transient unit of every VM (see `unit_spec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmUnitConfig {
    /// Memory allowed beyond the guest's own (hypervisor, device emulation), in MiB.
    pub memory_overhead_mib: u64,
    /// `CPUWeight=` of every VM.
    pub cpu_weight: u64,
    /// `TasksMax=` of every VM.
    pub tasks_max: u64,
    /// `TimeoutStopSec=`: how long each stop phase may take (the graceful stop command, then
    /// SIGTERM) before systemd moves on and finally sends SIGKILL, in seconds.
    pub stop_timeout_secs: u64,
    /// How long a QEMU guest gets to power off after the ACPI power button (the unit's
    /// `ExecStop=`, `blixard-agent qmp-powerdown`) before systemd's SIGTERM, in seconds.
    /// Less than `stop_timeout_secs`.
    pub graceful_stop_secs: u64,
}

impl Default for VmUnitConfig {
    fn default() -> Self {
        VmUnitConfig {
            memory_overhead_mib: 128,
            cpu_weight: 100,
            tasks_max: 4096,
            stop_timeout_secs: 30,
            graceful_stop_secs: 20,
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/blixard-agent")
}
fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/blixard-agent")
}
fn default_image_dir() -> PathBuf {
    PathBuf::from("/var/lib/blixard/images")
}
fn default_ip() -> PathBuf {
    PathBuf::from("/usr/sbin/ip")
}
fn default_journalctl() -> PathBuf {
    PathBuf::from("/usr/bin/journalctl")
}
fn default_heartbeat_ms() -> u64 {
    500
}
fn default_lease_ms() -> u64 {
    2000
}
fn default_fence_grace_ms() -> u64 {
    500
}
fn default_memory_reserve_mib() -> u64 {
    512
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host_id: String::new(),
            control_endpoints: Vec::new(),
            data_dir: default_data_dir(),
            runtime_dir: default_runtime_dir(),
            image_dir: default_image_dir(),
            systemd_bus: SystemdBus::default(),
            labels: BTreeMap::new(),
            heartbeat_interval_ms: default_heartbeat_ms(),
            lease_ms: None,
            fence_grace_ms: default_fence_grace_ms(),
            fence_after_ms: None,
            process_command: None,
            hypervisors: BTreeMap::new(),
            qemu_machine: crate::hypervisor::QemuMachine::default(),
            memory_reserve_mib: default_memory_reserve_mib(),
            token_file: None,
            ca_file: None,
            advertise_address: String::new(),
            bridges: Vec::new(),
            ip: default_ip(),
            journalctl: default_journalctl(),
            kvm: None,
            vm_unit: VmUnitConfig::default(),
            api_listen: None,
            api_tls_cert_file: None,
            api_tls_key_file: None,
        }
    }
}

/// Settings given on the command line; each one that is set replaces the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host_id: Option<String>,
    pub control_endpoints: Option<Vec<String>>,
    pub data_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub image_dir: Option<PathBuf>,
    pub systemd_bus: Option<SystemdBus>,
    pub heartbeat_interval_ms: Option<u64>,
    pub lease_ms: Option<u64>,
}

impl Config {
    /// Parses a configuration from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            // toml's messages span several lines (a caret under the culprit); keep one.
            message: e
                .to_string()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
        })
    }

    /// Reads and parses a configuration file (without validating it).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: Overrides) {
        if let Some(v) = o.host_id {
            self.host_id = v;
        }
        if let Some(v) = o.control_endpoints {
            self.control_endpoints = v;
        }
        if let Some(v) = o.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = o.runtime_dir {
            self.runtime_dir = v;
        }
        if let Some(v) = o.image_dir {
            self.image_dir = v;
        }
        if let Some(v) = o.systemd_bus {
            self.systemd_bus = v;
        }
        if let Some(v) = o.heartbeat_interval_ms {
            self.heartbeat_interval_ms = v;
        }
        if let Some(v) = o.lease_ms {
            self.lease_ms = Some(v);
        }
    }

    /// Checks that every setting is usable; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::dns_label("host_id", &self.host_id).map_err(|e| invalid(e.field, e.message))?;
        if self.control_endpoints.is_empty() {
            return Err(invalid(
                "control_endpoints",
                "at least one endpoint is needed",
            ));
        }
        for (i, e) in self.control_endpoints.iter().enumerate() {
            let ok = (e.starts_with("http://") || e.starts_with("https://"))
                && !e.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(invalid(
                    format!("control_endpoints[{i}]"),
                    format!("{e:?} must look like http://host:port"),
                ));
            }
        }
        for (field, dir) in [
            ("data_dir", &self.data_dir),
            ("runtime_dir", &self.runtime_dir),
            ("image_dir", &self.image_dir),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} must be an absolute path", dir.display()),
                ));
            }
        }
        if !(100..=600_000).contains(&self.heartbeat_interval_ms) {
            return Err(invalid(
                "heartbeat_interval_ms",
                "must be between 100 and 600000",
            ));
        }
        let lease = self.lease_ms();
        if lease < 2 * self.heartbeat_interval_ms
            || !(validate::MIN_LEASE_MS..=validate::MAX_LEASE_MS).contains(&lease)
        {
            return Err(invalid(
                self.lease_field(),
                format!(
                    "must be at least twice heartbeat_interval_ms and between {} and {}",
                    validate::MIN_LEASE_MS,
                    validate::MAX_LEASE_MS
                ),
            ));
        }
        if self.fence_grace_ms > validate::MAX_FENCE_GRACE_MS {
            return Err(invalid(
                "fence_grace_ms",
                format!("must be at most {}", validate::MAX_FENCE_GRACE_MS),
            ));
        }
        if let Some(cmd) = &self.process_command {
            match cmd.first() {
                None => return Err(invalid("process_command", "must not be empty")),
                Some(p) if !p.starts_with('/') => {
                    return Err(invalid(
                        "process_command",
                        format!("{p:?} must be an absolute path"),
                    ))
                }
                Some(_) => {}
            }
            if cmd.iter().any(|a| a.contains('\0')) {
                return Err(invalid("process_command", "arguments must not contain NUL"));
            }
        }
        for (name, path) in &self.hypervisors {
            if hypervisor_by_name(name).is_none() {
                return Err(invalid(
                    format!("hypervisors.{name}"),
                    "unknown hypervisor (qemu, cloud-hypervisor, firecracker)",
                ));
            }
            if !path.is_absolute() {
                return Err(invalid(
                    format!("hypervisors.{name}"),
                    format!("{} must be an absolute path", path.display()),
                ));
            }
        }
        // The same rules as the control plane's, so a bad label fails here, not at
        // registration.
        validate::labels("labels", &self.labels).map_err(|e| invalid(e.field, e.message))?;
        if self.api_tls_cert_file.is_some() != self.api_tls_key_file.is_some() {
            return Err(invalid(
                "api_tls_cert_file",
                "api_tls_cert_file and api_tls_key_file go together",
            ));
        }
        if self.api_tls_cert_file.is_some() && self.api_listen.is_none() {
            return Err(invalid("api_tls_cert_file", "needs api_listen"));
        }
        for (field, file) in [
            ("token_file", &self.token_file),
            ("ca_file", &self.ca_file),
            ("api_tls_cert_file", &self.api_tls_cert_file),
            ("api_tls_key_file", &self.api_tls_key_file),
        ] {
            if let Some(f) = file {
                if !f.is_absolute() {
                    return Err(invalid(
                        field,
                        format!("{} must be an absolute path", f.display()),
                    ));
                }
            }
        }
        if self.ca_file.is_none()
            && self
                .control_endpoints
                .iter()
                .any(|e| e.starts_with("https://"))
        {
            return Err(invalid(
                "ca_file",
                "https:// endpoints need the control plane's CA bundle",
            ));
        }
        if let Some(listen) = &self.api_listen {
            let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
                invalid(
                    "api_listen",
                    format!("{listen:?} is not an IP:port address"),
                )
            })?;
            if addr.ip().is_unspecified() {
                return Err(invalid(
                    "api_listen",
                    "must name the address the control plane connects to, not 0.0.0.0 or ::",
                ));
            }
            if self.token_file.is_none() && !addr.ip().is_loopback() {
                return Err(invalid(
                    "api_listen",
                    "without token_file the agent API serves only on loopback",
                ));
            }
        }
        let u = &self.vm_unit;
        if u.cpu_weight == 0 || u.cpu_weight > 10_000 {
            return Err(invalid("vm_unit.cpu_weight", "must be between 1 and 10000"));
        }
        if u.tasks_max == 0 {
            return Err(invalid("vm_unit.tasks_max", "must be at least 1"));
        }
        if u.stop_timeout_secs == 0 {
            return Err(invalid("vm_unit.stop_timeout_secs", "must be at least 1"));
        }
        if u.graceful_stop_secs >= u.stop_timeout_secs {
            return Err(invalid(
                "vm_unit.graceful_stop_secs",
                "must be less than vm_unit.stop_timeout_secs (systemd ends the stop command after that)",
            ));
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// The lease in force: `lease_ms`, else the deprecated `fence_after_ms`, else 2000.
    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
            .or(self.fence_after_ms)
            .unwrap_or_else(default_lease_ms)
    }

    /// The setting [`Config::lease_ms`] comes from, for messages.
    fn lease_field(&self) -> &'static str {
        if self.lease_ms.is_none() && self.fence_after_ms.is_some() {
            "fence_after_ms"
        } else {
            "lease_ms"
        }
    }

    /// A warning to log when the configuration uses deprecated settings.
    pub fn deprecation_warning(&self) -> Option<String> {
        self.fence_after_ms.map(|f| match self.lease_ms {
            Some(l) => {
                format!("fence_after_ms = {f} is deprecated and ignored: lease_ms = {l} is set")
            }
            None => format!(
                "fence_after_ms is deprecated (fencing is on by default): read as lease_ms = {f}"
            ),
        })
    }

    /// The timing the registration carries.
    pub fn fence_timing(&self) -> blixard_api::FenceTiming {
        blixard_api::FenceTiming {
            lease_ms: self.lease_ms(),
            grace_ms: self.fence_grace_ms,
        }
    }
}

/// The hypervisor a `hypervisors` table key names (`process` is configured by
/// `process_command`, not here).
pub fn hypervisor_by_name(name: &str) -> Option<Hypervisor> {
    match name {
        "qemu" => Some(Hypervisor::Qemu),
        "cloud-hypervisor" => Some(Hypervisor::CloudHypervisor),
        "firecracker" => Some(Hypervisor::Firecracker),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("agent.toml"))
    }

    const MINIMAL: &str = r#"
        host_id = "h1"
        control_endpoints = ["http://127.0.0.1:7001"]
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.heartbeat_interval_ms, 500);
        assert_eq!(c.lease_ms(), 2000);
        assert_eq!(c.fence_grace_ms, 500);
        assert_eq!(
            c.fence_timing(),
            blixard_api::FenceTiming {
                lease_ms: 2000,
                grace_ms: 500
            }
        );
        assert_eq!(c.deprecation_warning(), None);
        assert_eq!(c.systemd_bus, SystemdBus::System);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/blixard-agent"));
        assert_eq!(c.vm_unit, VmUnitConfig::default());
        assert!(c.process_command.is_none());
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
            host_id = "h2"
            control_endpoints = ["http://127.0.0.1:7001", "https://ctl:7002"]
            data_dir = "/srv/b"
            runtime_dir = "/run/b"
            image_dir = "/srv/b/img"
            systemd_bus = "session"
            heartbeat_interval_ms = 500
            process_command = ["/bin/sleep", "infinity"]
            memory_reserve_mib = 1024
            token_file = "/run/credentials/blixard-agent.service/token"
            ca_file = "/etc/blixard/ca.pem"
            api_listen = "10.0.0.5:7101"
            api_tls_cert_file = "/etc/blixard/tls/agent.pem"
            api_tls_key_file = "/etc/blixard/tls/agent.key"
            [labels]
            zone = "a"
            [hypervisors]
            qemu = "/usr/bin/qemu-system-x86_64"
            [vm_unit]
            memory_overhead_mib = 64
            "#,
        )
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.systemd_bus, SystemdBus::Session);
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.vm_unit.memory_overhead_mib, 64);
        assert_eq!(c.vm_unit.tasks_max, 4096);
    }

    #[test]
    fn unknown_keys_are_refused_in_one_line() {
        let e = parse("host_id = \"h1\"\nhostid = \"x\"\n").expect_err("unknown key");
        let msg = e.to_string();
        assert!(msg.contains("hostid"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn invalid_settings_are_named() {
        let cases: &[(&str, &str)] = &[
            ("host_id = \"H1\"\ncontrol_endpoints = [\"http://a:1\"]", "host_id"),
            ("host_id = \"h1\"", "control_endpoints"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"a:1\"]", "control_endpoints[0]"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\ndata_dir = \"rel\"", "data_dir"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\nheartbeat_interval_ms = 5", "heartbeat_interval_ms"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\nprocess_command = []", "process_command"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"https://a:1\"]", "ca_file"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"https://a:1\"]\nca_file = \"ca.pem\"", "ca_file"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\nprocess_command = [\"sleep\"]", "process_command"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\n[hypervisors]\nkvmtool = \"/x\"", "hypervisors.kvmtool"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\n[vm_unit]\ncpu_weight = 0", "vm_unit.cpu_weight"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\n[vm_unit]\nstop_timeout_secs = 10", "vm_unit.graceful_stop_secs"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\napi_listen = \"localhost:1\"", "api_listen"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\napi_listen = \"0.0.0.0:7101\"", "api_listen"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\napi_listen = \"10.0.0.5:7101\"", "api_listen"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\napi_listen = \"127.0.0.1:0\"\napi_tls_cert_file = \"/c.pem\"", "api_tls_cert_file"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\napi_tls_cert_file = \"/c.pem\"\napi_tls_key_file = \"/k.pem\"", "api_tls_cert_file"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\napi_listen = \"127.0.0.1:0\"\napi_tls_cert_file = \"c.pem\"\napi_tls_key_file = \"/k.pem\"", "api_tls_cert_file"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\nfence_after_ms = 900", "fence_after_ms"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\nlease_ms = 900", "lease_ms"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\nheartbeat_interval_ms = 2000", "lease_ms"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\nlease_ms = 600001\nheartbeat_interval_ms = 1000", "lease_ms"),
            ("host_id = \"h1\"\ncontrol_endpoints = [\"http://a:1\"]\nfence_grace_ms = 60001", "fence_grace_ms"),
        ];
        for (text, field) in cases {
            let c = parse(text).expect("parses");
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(&f, field, "{text}"),
                other => panic!("{text}: expected invalid {field}, got {other:?}"),
            }
        }
    }

    /// `fence_after_ms` still works, as the lease, with a warning; `lease_ms` wins.
    #[test]
    fn fence_after_ms_is_a_deprecated_alias_of_lease_ms() {
        let cases = [
            ("fence_after_ms = 3000", 3000, true),
            ("lease_ms = 4000\nfence_after_ms = 3000", 4000, true),
            ("lease_ms = 4000", 4000, false),
        ];
        for (extra, lease, warned) in cases {
            let c = parse(&format!("{MINIMAL}\n{extra}\n")).expect("parses");
            c.validate().expect("valid");
            assert_eq!(c.lease_ms(), lease, "{extra}");
            assert_eq!(c.fence_timing().lease_ms, lease, "{extra}");
            assert_eq!(c.deprecation_warning().is_some(), warned, "{extra}");
        }
    }

    #[test]
    fn overrides_replace_file_settings() {
        let mut c = parse(MINIMAL).expect("parses");
        c.apply(Overrides {
            host_id: Some("h9".into()),
            systemd_bus: Some(SystemdBus::Session),
            control_endpoints: Some(vec!["http://127.0.0.1:9".into()]),
            ..Overrides::default()
        });
        assert_eq!(c.host_id, "h9");
        assert_eq!(c.systemd_bus, SystemdBus::Session);
        assert_eq!(c.control_endpoints, vec!["http://127.0.0.1:9".to_string()]);
        assert_eq!(
            "session".parse::<SystemdBus>().ok(),
            Some(SystemdBus::Session)
        );
        assert!("user".parse::<SystemdBus>().is_err());
    }
}
