//! The API as a contract (issue 17), against real control nodes over real sockets: nothing a
//! request carries is silently dropped, inputs are refused at admission, bodies are bounded in
//! size and time, framing errors get a 400, `/metrics` reads with Prometheus' own parser, and
//! error messages never echo a refused character.

use std::time::{Duration, Instant};

use blixard_tests::cluster::Cluster;
use blixard_tests::raw::exchange;
use blixard_tests::{pytools, vms};

const DEADLINE: Duration = Duration::from_secs(30);

fn spec_json(name: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "vcpus": 1, "memory_mib": 64, "hypervisor": "process"})
}

/// Status and JSON body of one request with reqwest.
async fn send(
    method: reqwest::Method,
    url: String,
    body: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let http = reqwest::Client::new();
    let mut req = http.request(method, &url).timeout(Duration::from_secs(20));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok((status, json))
}

fn error_code(v: &serde_json::Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn t15_preconditions_in_the_wrong_place_are_refused() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let client = c.client();
    let base = c.nodes[0].url.clone();
    let vm = vms::create(&client, &serde_json::from_value(spec_json("pre-1"))?).await?;
    let generation = vm.generation;

    // DELETE with the precondition in a body: refused, and the VM is still there.
    let (status, body) = send(
        reqwest::Method::DELETE,
        format!("{base}/v1/vms/pre-1"),
        Some(r#"{"expected_generation":99}"#),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("expected_generation goes in the query")),
        "{body}"
    );
    assert_eq!(client.get_vm("pre-1").await?.generation, generation);

    // PUT with the precondition in the query: refused, and nothing changed.
    let update = serde_json::json!({"spec": {"name": "pre-1", "vcpus": 2, "memory_mib": 64,
        "hypervisor": "process"}});
    let (status, body) = send(
        reqwest::Method::PUT,
        format!("{base}/v1/vms/pre-1?expected_generation=99"),
        Some(&update.to_string()),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    let now = client.get_vm("pre-1").await?;
    assert_eq!((now.generation, now.spec.vcpus), (generation, 1));

    // Unknown query parameters, on every route, and bodies where none is read.
    let create = spec_json("pre-2").to_string();
    let update = update.to_string();
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let routes: Vec<(reqwest::Method, &str, Option<&str>)> = vec![
        (get.clone(), "/v1/health", None),
        (get.clone(), "/metrics", None),
        (get.clone(), "/v1/cluster/status", None),
        (get.clone(), "/v1/cluster/members", None),
        (post.clone(), "/v1/cluster/members", Some("{}")),
        (reqwest::Method::DELETE, "/v1/cluster/members/9", None),
        (get.clone(), "/v1/vms", None),
        (post.clone(), "/v1/vms", Some(&*create)),
        (get.clone(), "/v1/vms/pre-1", None),
        (reqwest::Method::PUT, "/v1/vms/pre-1", Some(&*update)),
        (reqwest::Method::DELETE, "/v1/vms/pre-1", None),
        (post.clone(), "/v1/vms/pre-1/start", None),
        (post.clone(), "/v1/vms/pre-1/stop", None),
        (get.clone(), "/v1/vms/pre-1/logs", None),
        (get.clone(), "/v1/hosts", None),
        (post.clone(), "/v1/hosts", Some("{}")),
        (get.clone(), "/v1/hosts/h1", None),
        (post.clone(), "/v1/hosts/h1/heartbeat", None),
        (post.clone(), "/v1/hosts/h1/drain", None),
        (post.clone(), "/v1/hosts/h1/undrain", None),
        (post.clone(), "/v1/hosts/h1/declare-gone", None),
        (get.clone(), "/v1/events", None),
        (post.clone(), "/v1/plan", Some(r#"{"vms":[]}"#)),
        (get.clone(), "/v1/cluster/snapshot", None),
        (post.clone(), "/v1/cluster/snapshot", Some("{}")),
        (get.clone(), "/v1/hosts/h1/assignments", None),
        (
            reqwest::Method::PUT,
            "/v1/hosts/h1/vms/pre-1/status",
            Some("{}"),
        ),
    ];
    for (method, path, body) in &routes {
        let (status, resp) = send(method.clone(), format!("{base}{path}?bogus=1"), *body).await?;
        assert_eq!(status, 400, "{method} {path}?bogus=1: {resp}");
        assert_eq!(
            error_code(&resp),
            "invalid_argument",
            "{method} {path}: {resp}"
        );
    }
    for (method, path, body) in &routes {
        if body.is_some() || *path == "/v1/hosts/h1/drain" {
            continue;
        }
        let (status, resp) =
            send(method.clone(), format!("{base}{path}"), Some(r#"{"x":1}"#)).await?;
        assert_eq!(status, 400, "{method} {path} with a body: {resp}");
    }
    // The empty object that the bundled client sends to bodyless POSTs stays accepted.
    let (status, resp) = send(post, format!("{base}/v1/vms/pre-1/stop"), Some("{}")).await?;
    assert_eq!(status, 200, "{resp}");
    // And the precondition where it belongs is honoured.
    let (status, resp) = send(
        reqwest::Method::DELETE,
        format!("{base}/v1/vms/pre-1?expected_generation=99"),
        None,
    )
    .await?;
    assert_eq!(status, 409, "{resp}");
    Ok(())
}

#[tokio::test]
async fn t15_image_paths_leaving_the_image_directory_are_refused_at_admission() -> anyhow::Result<()>
{
    let c = Cluster::start(1).await?;
    let base = c.nodes[0].url.clone();
    let spec = |field: &str, value: &str| {
        let mut s = serde_json::json!({"name": "paths-1", "vcpus": 1, "memory_mib": 64,
            "hypervisor": "qemu", "kernel": "vmlinuz"});
        if field == "disk" {
            s["disks"] = serde_json::json!([{"path": value}]);
        } else {
            s[field] = serde_json::json!(value);
        }
        s.to_string()
    };
    let cases = [
        ("kernel", "/etc/shadow", "is absolute"),
        ("initrd", "/etc/shadow", "is absolute"),
        ("disk", "/dev/sda", "is absolute"),
        ("kernel", "../../etc/shadow", "'..'"),
        ("disk", "img/../../x", "'..'"),
        ("kernel", "./", "names no file"),
    ];
    for (field, value, want) in cases {
        let (status, body) = send(
            reqwest::Method::POST,
            format!("{base}/v1/vms"),
            Some(&spec(field, value)),
        )
        .await?;
        assert_eq!(status, 400, "{field}={value}: {body}");
        let msg = body["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(want), "{field}={value}: {msg}");
    }
    assert!(c.client().list_vms().await?.is_empty(), "nothing stored");
    Ok(())
}

#[tokio::test]
async fn t15_bodies_are_bounded_in_size_and_time_and_framing_errors_are_400() -> anyhow::Result<()>
{
    let c = Cluster::start(1).await?;
    let addr = c.nodes[0].listen.clone();
    let quick = Duration::from_secs(5);

    // A body announced past the limit is refused from the header, without waiting for it.
    let head = format!(
        "POST /v1/vms HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 104857600\r\n\r\n"
    );
    let r = exchange(&addr, &head, b"{\"name\":", quick).await?;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(
        r.json().map(|j| error_code(&j).to_string()).as_deref(),
        Some("payload_too_large"),
        "{r:?}"
    );

    // Also after `Expect: 100-continue`: a 413 and no invitation to send the body.
    let head = format!(
        "PUT /v1/vms/x HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 104857600\r\nExpect: 100-continue\r\n\r\n"
    );
    let r = exchange(&addr, &head, b"", quick).await?;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(!r.head.contains("100 Continue"), "{r:?}");

    // A body that does not arrive: 408 after the body timeout, not a hang.
    let head = format!(
        "POST /v1/vms HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n"
    );
    let start = Instant::now();
    let r = exchange(&addr, &head, b"{\"name\":", Duration::from_secs(30)).await?;
    assert_eq!(r.status, 408, "{r:?}");
    assert_eq!(
        r.json().map(|j| error_code(&j).to_string()).as_deref(),
        Some("request_timeout"),
        "{r:?}"
    );
    assert!(
        start.elapsed() >= Duration::from_secs(9),
        "{:?}",
        start.elapsed()
    );

    // Framing errors below the JSON layer: hyper answers them with a 400 before any handler
    // runs (so without our JSON body: hyper writes the answer itself).
    let framing = [
        (
            "two Content-Lengths",
            format!(
                "POST /v1/vms HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 2\r\n\
                 Content-Length: 3\r\n\r\n{{}}"
            ),
        ),
        ("broken request line", "GARBAGE\r\n\r\n".to_string()),
        (
            "space in the target",
            format!("GET /v1/ vms HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
        ),
    ];
    for (what, head) in framing {
        let r = exchange(&addr, &head, b"", quick).await?;
        assert_eq!(r.status, 400, "{what}: {r:?}");
    }

    // The node still serves after all of it.
    assert_eq!(c.client().health().await?.status, "ok");
    Ok(())
}

/// `prometheus_client`'s OpenMetrics parser over `text`: family name → number of samples.
fn parse_metrics(text: &str) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let python = pytools::tool("python")?;
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "samples": len(f.samples)}
print(json.dumps(out))
"#;
    use std::io::Write;
    let mut child = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test]
async fn t15_metrics_parse_with_prometheus_client_on_leader_and_follower() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let leader = c.wait_converged(Duration::from_secs(30)).await?;
    let follower = (leader + 1) % 3;
    vms::create(
        &c.client(),
        &serde_json::from_value(spec_json("metrics-1"))?,
    )
    .await?;
    let http = reqwest::Client::new();
    let mut families = Vec::new();
    for i in [leader, follower] {
        // A request first, so that the request counter has a sample on each.
        c.node_client(i).list_vms().await?;
        let resp = http
            .get(format!("{}/metrics", c.nodes[i].url))
            .timeout(Duration::from_secs(20))
            .send()
            .await?;
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(
            ctype.starts_with("application/openmetrics-text; version=1.0.0"),
            "{ctype}"
        );
        let text = resp.text().await?;
        assert!(text.ends_with("# EOF\n"), "{text}");
        let parsed = parse_metrics(&text)?;
        let samples = |name: &str| parsed[name]["samples"].as_u64().unwrap_or(0);
        assert!(samples("blixard_api_requests") > 0, "node {i}: {parsed:?}");
        assert_eq!(parsed["blixard_api_requests"]["type"], "counter");
        assert!(samples("blixard_raft_term") == 1, "node {i}: {parsed:?}");
        assert!(samples("blixard_vms") == 1, "node {i}: {parsed:?}");
        families.push(parsed.keys().cloned().collect::<Vec<_>>());
    }
    assert_eq!(
        families[0], families[1],
        "leader and follower name the same metrics"
    );
    Ok(())
}

#[tokio::test]
async fn t15_refused_characters_are_escaped_in_error_messages() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let base = c.nodes[0].url.clone();
    let mut label_key = spec_json("esc-1");
    label_key["constraints"] = serde_json::json!({"a\u{202e}b": "x"});
    let mut unknown_field = spec_json("esc-2");
    unknown_field["x\u{202e}y"] = serde_json::json!(1);
    for body in [label_key, unknown_field] {
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{base}/v1/vms"))
            .json(&body)
            .timeout(Duration::from_secs(20))
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 400);
        // The raw bytes: JSON could carry the character as `\u202e` too; neither may appear.
        let raw = resp.text().await?;
        assert!(!raw.contains('\u{202e}'), "{raw:?}");
        assert!(!raw.to_lowercase().contains("\\u202e"), "{raw:?}");
        let v: serde_json::Value = serde_json::from_str(&raw)?;
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains("\\u{202e}"), "{msg:?}");
    }
    Ok(())
}

#[tokio::test]
async fn t15_removing_the_last_voter_is_a_409_not_a_500() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let base = c.nodes[0].url.clone();
    let (status, body) = send(
        reqwest::Method::DELETE,
        format!("{base}/v1/cluster/members/1"),
        None,
    )
    .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_code(&body), "conflict", "{body}");
    assert_eq!(body["error"]["message"], "cannot remove the last voter");
    let (status, body) = send(
        reqwest::Method::DELETE,
        format!("{base}/v1/cluster/members/7"),
        None,
    )
    .await?;
    assert_eq!(status, 404, "{body}");
    assert_eq!(c.client().members().await?.len(), 1);
    Ok(())
}

/// Found by schemathesis: a member added at an existing member's address (here the node's
/// own) made openraft's core receive its own RPCs and panic, and the node exited.
#[tokio::test]
async fn t15_schemathesis_add_member_at_an_existing_members_address_is_409() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let base = c.nodes[0].url.clone();
    let body = serde_json::json!({"id": 2, "addr": base}).to_string();
    let (status, resp) = send(
        reqwest::Method::POST,
        format!("{base}/v1/cluster/members"),
        Some(&body),
    )
    .await?;
    assert_eq!(status, 409, "{resp}");
    // Another name for the same node gets past that check; the node refuses RPCs from
    // itself, so it stays up (the add fails, or times out, but nothing panics).
    let alias = base.replace("127.0.0.1", "localhost");
    let body = serde_json::json!({"id": 3, "addr": alias}).to_string();
    let _ = tokio::time::timeout(
        Duration::from_secs(40),
        send(
            reqwest::Method::POST,
            format!("{base}/v1/cluster/members"),
            Some(&body),
        ),
    )
    .await;
    assert!(c.is_running(0), "{}", c.log_tail(0));
    assert!(!c.log_text(0).contains("panicked"), "{}", c.log_tail(0));
    assert_eq!(c.client().health().await?.status, "ok");
    Ok(())
}

/// schemathesis (an independent client, generated from `GET /v1/openapi.json`) against a
/// 3-node cluster with TLS and tokens: no 5xx, every response as described. Bounded in
/// examples per operation and in time. Membership changes are covered by t10 instead.
#[tokio::test]
async fn t15_schemathesis_against_a_secure_three_node_cluster() -> anyhow::Result<()> {
    let st = pytools::tool("schemathesis")?;
    let validator = pytools::tool("openapi-spec-validator")?;
    let (c, ca) = Cluster::start_secure(3).await?;
    let leader = c.wait_converged(Duration::from_secs(30)).await?;
    let follower = (leader + 1) % 3;
    let base = c.nodes[follower].url.clone();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?)
        .build()?;
    // Served without a token, and valid OpenAPI 3.1.
    let doc = http
        .get(format!("{base}/v1/openapi.json"))
        .timeout(Duration::from_secs(20))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &doc)?;
    let v: serde_json::Value = serde_json::from_str(&doc)?;
    assert_eq!(v["openapi"], "3.1.0");
    let out = std::process::Command::new(validator).arg(&file).output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let token = blixard_tests::cluster::OPERATOR_TOKEN;
    let out = tokio::process::Command::new(st)
        .arg("run")
        .arg(&file)
        .args(["-u", &base])
        .arg("--tls-verify")
        .arg(&ca)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        // Membership changes are left out: generated ones remove the leader or add voters
        // that do not exist, and the elections that follow answer 503 `no_leader` (as
        // documented) to whatever runs meanwhile. t10_cluster tests them.
        .args(["--exclude-name", "POST /v1/cluster/members"])
        .args(["--exclude-name", "DELETE /v1/cluster/members/{id}"])
        .args(["--max-examples", "15", "--max-time", "150", "--seed", "17"])
        .args(["--request-timeout", "65", "--no-color"])
        .current_dir(dir.path())
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The counts for the record (`cargo nextest ... --no-capture` shows them).
    for line in text
        .lines()
        .filter(|l| l.contains("generated") || l.contains("Tested:") || l.contains("Selected:"))
    {
        eprintln!("schemathesis: {}", line.trim());
    }
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    for i in 0..3 {
        assert!(c.is_running(i), "node {i} exited: {}", c.log_tail(i));
    }
    Ok(())
}

/// Idempotency keys like the payment APIs' (issue 17 item 4): the key is bound to its
/// request (another body under it is 422, not the first VM), it outlives a delete (a retry is
/// 409 `idempotency_key_spent`, not a second VM), on every node and across a restart.
#[tokio::test]
async fn t15_idempotency_keys_are_bound_to_their_request_and_outlive_a_delete() -> anyhow::Result<()>
{
    let mut c = Cluster::start(3).await?;
    let client = c.client();
    let spec: blixard_api::VmSpec = serde_json::from_value(spec_json("idem-1"))?;
    let first = client.create_vm_idempotent(&spec, "key-idem-1").await?;
    let again = client.create_vm_idempotent(&spec, "key-idem-1").await?;
    assert_eq!(
        (again.spec.name.as_str(), again.created_ms),
        ("idem-1", first.created_ms)
    );
    let mut other: blixard_api::VmSpec = serde_json::from_value(spec_json("idem-2"))?;
    other.memory_mib = 128;
    let e = client
        .create_vm_idempotent(&other, "key-idem-1")
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("another request under a used key was accepted"))?;
    assert_eq!(
        (e.status(), e.code()),
        (Some(422), Some("idempotency_key_mismatch")),
        "{e}"
    );
    assert!(client
        .get_vm("idem-2")
        .await
        .err()
        .is_some_and(|e| e.is_not_found()));

    client.delete_vm("idem-1").await?;
    let spent = |r: Result<blixard_api::Vm, blixard_api::ClientError>| {
        r.err().map(|e| (e.status(), e.code().map(str::to_string)))
    };
    let want = Some((Some(409), Some("idempotency_key_spent".to_string())));
    assert_eq!(
        spent(client.create_vm_idempotent(&spec, "key-idem-1").await),
        want
    );
    // The key survives a restart of the whole cluster (it is a row of its own), and every
    // node answers the same.
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.restart(i)?;
    }
    c.wait_converged(DEADLINE).await?;
    for i in 0..3 {
        let direct = c.node_client(i);
        assert_eq!(
            spent(direct.create_vm_idempotent(&spec, "key-idem-1").await),
            want,
            "node {i}"
        );
    }
    assert!(client
        .get_vm("idem-1")
        .await
        .err()
        .is_some_and(|e| e.is_not_found()));
    // A new key creates it again.
    client.create_vm_idempotent(&spec, "key-idem-2").await?;
    Ok(())
}

/// Snapshots of real size (issue 17 item 5): `blixardctl cluster snapshot restore` of a
/// snapshot with 10,000 VMs and 1,000 hosts works (the 64 KiB limit of other bodies does not
/// apply to it), every node holds the result, and a VM that existed before comes back with a
/// higher generation than it had, never a lower one.
#[tokio::test]
async fn t15_a_snapshot_of_10000_vms_and_1000_hosts_restores() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let client = c.client();
    client.register_host(&vms::process_host("snap-h0")).await?;
    let before = vms::create(&client, &serde_json::from_value(spec_json("snap-vm-0"))?).await?;
    // Taken now, then grown to size from its own records.
    let mut snap = client.save_snapshot().await?;
    let (host, vm) = (snap.hosts[0].clone(), snap.vms[0].clone());
    snap.hosts = (0..1_000)
        .map(|i| {
            let mut h = host.clone();
            h.id = format!("snap-h{i}");
            h
        })
        .collect();
    snap.vms = (0..10_000)
        .map(|i| {
            let mut v = vm.clone();
            v.spec.name = format!("snap-vm-{i}");
            v.host = None;
            v.state = blixard_api::VmState::Pending;
            v
        })
        .collect();
    // Meanwhile the VM moves on to a newer generation than the snapshot holds.
    let mut bigger = before.spec.clone();
    bigger.memory_mib = 128;
    let now = client
        .update_vm(&blixard_api::UpdateVm {
            spec: bigger,
            expected_generation: None,
        })
        .await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("snap.json");
    std::fs::write(&file, serde_json::to_vec(&snap)?)?;
    let size = std::fs::metadata(&file)?.len();
    assert!(size > 64 * 1024, "the snapshot is {size} bytes");
    let out = std::process::Command::new(blixard_tests::binaries::binary("blixardctl"))
        .env("BLIXARD_ENDPOINTS", c.endpoints().join(","))
        .args(["cluster", "snapshot", "restore"])
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "restore of {size} bytes: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        (0..3)
            .map(|i| c.log_tail(i))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    for i in 0..3 {
        let n = c.node_client(i);
        let hosts = n.list_hosts().await?;
        let vms = n.list_vms().await?;
        assert_eq!((hosts.len(), vms.len()), (1_000, 10_000), "node {i}");
    }
    let back = client.get_vm("snap-vm-0").await?;
    assert!(
        back.generation > now.generation,
        "restored at generation {}, was {}",
        back.generation,
        now.generation
    );
    Ok(())
}
