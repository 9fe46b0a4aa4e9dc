//! A VM's logs: `blixardctl vm logs` and `vm show` through any control node, which forwards
//! to the agent of the VM's host, which reads that host's own journal. Real control nodes
//! (with tokens and TLS), a real systemd host, the real agent, and a `process` VM that prints
//! lines to stdout (so they land in the host's journal).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::Context;
use blixard_api::{LogLine, LogSource, VmState};
use blixard_tests::cluster::{write_agent_token, Cluster, OPERATOR_TOKEN};
use blixard_tests::host::SimHost;
use blixard_tests::vms::{self, with_logs, DEADLINE};
use blixard_tests::{binaries::binary, wait};

/// The VM's program: a numbered tick every 0.2 s, and `after-marker` once a trigger file
/// appears (so the test knows a line was printed after its request started).
const SCRIPT: &str = r#"#!/bin/sh
i=0
while :; do
  echo "tick-$i"
  if [ -e "$1" ]; then echo "after-marker"; rm -f "$1"; fi
  i=$((i+1))
  sleep 0.2
done
"#;

struct Ctl<'a> {
    cluster: &'a Cluster,
    token_file: &'a Path,
}

impl Ctl<'_> {
    /// `blixardctl` against `endpoints` with the operator's token and the cluster's CA.
    fn command(&self, endpoints: &[String], args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(binary("blixardctl"));
        cmd.env("BLIXARD_ENDPOINTS", endpoints.join(","))
            .env("BLIXARD_TOKEN_FILE", self.token_file)
            .args(args)
            .stdin(Stdio::null());
        if let Some(ca) = self.cluster.ca_file() {
            cmd.env("BLIXARD_CA_FILE", ca);
        }
        Ok(cmd)
    }

    /// Runs `blixardctl` to the end, bounded by a deadline (a hang is a failure).
    async fn run(&self, endpoints: &[String], args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = tokio::process::Command::from(self.command(endpoints, args)?);
        cmd.kill_on_drop(true);
        tokio::time::timeout(DEADLINE, cmd.output())
            .await
            .with_context(|| format!("blixardctl {args:?} did not finish within {DEADLINE:?}"))?
            .context("running blixardctl")
    }
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_vm_logs_from_every_control_node() -> anyhow::Result<()> {
    let (cluster, ca) = Cluster::start_secure(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    let base = host.base_dir().to_path_buf();
    let agent_token = write_agent_token("h1", &base.join("agent-token"))?;
    let token_file = base.join("operator-token");
    std::fs::write(&token_file, format!("{OPERATOR_TOKEN}\n"))?;
    let script = base.join("ticker.sh");
    std::fs::write(&script, SCRIPT)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    let trigger = base.join("trigger");
    // The agent API serves HTTPS with a certificate for 127.0.0.1 from the cluster's CA.
    let certs = ca
        .parent()
        .ok_or_else(|| anyhow::anyhow!("the CA file has a directory"))?;
    host.spawn_agent(
        &cluster.endpoints(),
        &format!(
            "token_file = {:?}\nca_file = {:?}\napi_listen = \"127.0.0.1:0\"\n\
             api_tls_cert_file = {:?}\napi_tls_key_file = {:?}\n\
             process_command = [\"/bin/sh\", {:?}, {:?}]\n",
            base.join("agent-token").display().to_string(),
            ca.display().to_string(),
            certs.join("node.pem").display().to_string(),
            certs.join("node.key").display().to_string(),
            script.display().to_string(),
            trigger.display().to_string(),
        ),
    )?;
    let ctl = Ctl {
        cluster: &cluster,
        token_file: &token_file,
    };
    let h = &host;
    with_logs(&[h], async {
        let reg = vms::wait_registered(&client, "h1", 1).await?;
        let agent_url = reg
            .agent_url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("h1 registered without an agent_url"))?;
        anyhow::ensure!(agent_url.starts_with("https://127.0.0.1:"), "{agent_url}");
        vms::create(&client, &vms::process_spec("ticker", 64)).await?;
        vms::wait_state(&client, "ticker", VmState::Running, Some("h1")).await?;

        // The host's own journal has the lines; the agent, in the host's namespaces, reads
        // that journal and not the machine's.
        wait::until("ticks in h1's journal", DEADLINE, || async {
            let j = h
                .journal(&["-u", "blixard-vm-ticker.service"])
                .map_err(|e| e.to_string())?;
            Ok(j.lines()
                .filter(|l| l.starts_with("tick-"))
                .nth(5)
                .map(|_| ()))
        })
        .await?;

        // From each control node.
        for (i, endpoint) in cluster.endpoints().iter().enumerate() {
            let o = ctl
                .run(std::slice::from_ref(endpoint), &["vm", "logs", "ticker"])
                .await?;
            let out = text(&o.stdout);
            // Console lines, and systemd's own line about the unit.
            anyhow::ensure!(
                o.status.success()
                    && out.lines().any(|l| l.starts_with("tick-"))
                    && out
                        .lines()
                        .any(|l| l.starts_with("[unit] Started blixard-vm-ticker")),
                "node {i}: vm logs gave {:?}\nstdout: {out}\nstderr: {}",
                o.status,
                text(&o.stderr)
            );
        }

        // -n bounds the lines; -o json is NDJSON of LogLines.
        let o = ctl
            .run(
                &cluster.endpoints(),
                &["vm", "logs", "ticker", "-n", "3", "-o", "json"],
            )
            .await?;
        anyhow::ensure!(o.status.success(), "{}", text(&o.stderr));
        let lines: Vec<LogLine> = text(&o.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("-o json prints one LogLine a line")?;
        anyhow::ensure!(lines.len() == 3, "-n 3 gave {lines:?}");
        anyhow::ensure!(
            lines
                .iter()
                .all(|l| l.source == LogSource::Console && l.ts_us > 0),
            "{lines:?}"
        );
        let o = ctl
            .run(&cluster.endpoints(), &["vm", "logs", "ticker", "-n", "0"])
            .await?;
        anyhow::ensure!(o.status.code() == Some(2), "-n 0 is a usage error");

        // Follow: a line printed after the request started arrives.
        follow_sees_new_line(&ctl, &cluster.endpoints(), &trigger).await?;

        // vm show: the VM and its last console lines.
        let o = ctl
            .run(&cluster.endpoints(), &["vm", "show", "ticker"])
            .await?;
        let out = text(&o.stdout);
        anyhow::ensure!(
            o.status.success()
                && out.contains("host:        h1")
                && out.contains("console:     (last")
                && out.lines().any(|l| l.trim_start().starts_with("tick-")),
            "vm show: {out}{}",
            text(&o.stderr)
        );

        // Errors: no token 401, unknown VM 404 (exit 3), bad lines 400.
        let anon = cluster.client_with(&cluster.endpoints(), None);
        let e = anon
            .vm_logs("ticker", None, false, Some(Duration::from_secs(30)))
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("logs without a token were served"))?;
        anyhow::ensure!(e.status() == Some(401), "{e}");
        let o = ctl
            .run(&cluster.endpoints(), &["vm", "logs", "nosuchvm"])
            .await?;
        anyhow::ensure!(
            o.status.code() == Some(3) && text(&o.stderr).contains("vm nosuchvm not found"),
            "unknown vm: {:?} {}",
            o.status,
            text(&o.stderr)
        );
        let e = client
            .vm_logs("ticker", Some(10_001), false, Some(Duration::from_secs(30)))
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("lines=10001 was served"))?;
        anyhow::ensure!(e.status() == Some(400), "{e}");

        // The agent's own endpoint: the host's token only, VM names only.
        agent_refusals(&agent_url, agent_token, &ca).await?;
        Ok(())
    })
    .await?;

    // A killed host: a clear error naming the host, quickly (refused by its dead agent, or
    // 503 once the cluster declared it down), and `vm show` still works.
    host.kill()?;
    let o = ctl
        .run(&cluster.endpoints(), &["vm", "logs", "ticker"])
        .await?;
    let err = text(&o.stderr);
    anyhow::ensure!(
        o.status.code() == Some(5) && err.contains("host h1"),
        "logs of a VM on a killed host: {:?} {err}",
        o.status
    );
    let o = ctl
        .run(&cluster.endpoints(), &["vm", "show", "ticker"])
        .await?;
    let out = text(&o.stdout);
    anyhow::ensure!(
        o.status.success() && out.contains("console:     unavailable: ") && out.contains("h1"),
        "vm show of a VM on a killed host: {out}{}",
        text(&o.stderr)
    );
    Ok(())
}

/// `vm logs -f` prints a line the VM prints only after the stream is live.
async fn follow_sees_new_line(
    ctl: &Ctl<'_>,
    endpoints: &[String],
    trigger: &Path,
) -> anyhow::Result<()> {
    let mut child = ctl
        .command(endpoints, &["vm", "logs", "ticker", "-f", "-n", "1"])?
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting vm logs -f")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = async {
        // The stream is live once it delivers lines printed after it started: the -n 1 line
        // and then at least one more tick.
        let mut seen = 0;
        while seen < 2 {
            tokio::time::timeout(DEADLINE, rx.recv())
                .await
                .context("vm logs -f printed nothing")?
                .ok_or_else(|| anyhow::anyhow!("vm logs -f ended"))?;
            seen += 1;
        }
        std::fs::write(trigger, b"go")?;
        loop {
            let line = tokio::time::timeout(DEADLINE, rx.recv())
                .await
                .context("after-marker did not arrive through vm logs -f")?
                .ok_or_else(|| anyhow::anyhow!("vm logs -f ended"))?;
            if line == "after-marker" {
                anyhow::ensure!(
                    !following_journalctls().is_empty(),
                    "no journalctl --follow runs while vm logs -f does"
                );
                return Ok::<_, anyhow::Error>(());
            }
        }
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    result?;
    // The client went away: the control node drops its agent connection and the agent ends
    // its `journalctl --follow`.
    wait::until(
        "the agent's journalctl --follow to end",
        DEADLINE,
        || async {
            let left = following_journalctls();
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("still running: {left:?}"))
            }
        },
    )
    .await
}

/// Processes running `journalctl … --follow` on the ticker's unit.
fn following_journalctls() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| {
        let cmdline = std::fs::read(e.ok()?.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is = args.first()?.ends_with("journalctl")
            && args.iter().any(|a| a == "--follow")
            && args.iter().any(|a| a == "blixard-vm-ticker.service");
        is.then(|| args.join(" "))
    })
    .collect()
}

/// The agent refuses a wrong or missing token and anything that is not a VM name, and
/// serves only HTTPS when it has a certificate.
async fn agent_refusals(agent_url: &str, token: &str, ca: &Path) -> anyhow::Result<()> {
    let http = blixard_api::tls::trust_only(
        reqwest::Client::builder().timeout(Duration::from_secs(30)),
        ca,
    )?
    .build()?;
    let plain = agent_url.replacen("https://", "http://", 1);
    let r = http
        .get(format!("{plain}/v1/vms/ticker/logs?lines=1"))
        .bearer_auth(token)
        .send()
        .await;
    anyhow::ensure!(
        !r.as_ref().is_ok_and(|r| r.status().is_success()),
        "plain HTTP was served: {r:?}"
    );
    let cases = [
        ("/v1/vms/ticker/logs?lines=1", None, 401),
        (
            "/v1/vms/ticker/logs?lines=1",
            Some("agent-token-h2-for-tests-0001"),
            401,
        ),
        ("/v1/vms/ssh.service/logs?lines=1", Some(token), 400),
        ("/v1/vms/..%2Fetc/logs?lines=1", Some(token), 400),
        ("/v1/vms/ticker/logs?lines=1&unit=ssh", Some(token), 400),
        ("/v1/vms/ticker/logs?lines=1", Some(token), 200),
    ];
    for (path, tok, want) in cases {
        let mut req = http.get(format!("{agent_url}{path}"));
        if let Some(t) = tok {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        anyhow::ensure!(status == want, "{path} {tok:?}: {status} {body}");
        if want == 200 {
            let l: LogLine = serde_json::from_str(body.trim()).context("one LogLine")?;
            anyhow::ensure!(
                l.message.starts_with("tick-") || l.message == "after-marker",
                "{l:?}"
            );
        }
    }
    Ok(())
}
