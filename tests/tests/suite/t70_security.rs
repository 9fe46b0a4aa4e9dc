//! Authentication and TLS, against real control nodes serving HTTPS with bearer tokens.

use std::time::Duration;

use blixard_tests::cluster::{Cluster, ClusterOptions, AGENT_TOKENS, OPERATOR_TOKEN, PEER_TOKEN};
use blixard_tests::vms::process_host;
use blixard_tests::wait;

fn spec_json(name: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "vcpus": 1, "memory_mib": 64, "hypervisor": "process"})
}

#[tokio::test]
async fn t70_tokens_are_required_and_scoped_over_tls() -> anyhow::Result<()> {
    let c = Cluster::start_with(
        3,
        ClusterOptions {
            secure: true,
            ..Default::default()
        },
    )
    .await?;
    let eps = c.endpoints();
    assert!(eps.iter().all(|e| e.starts_with("https://")));

    // The operator, over TLS, through a follower (forwarded to the leader with the peer token).
    let leader = c.wait_converged(Duration::from_secs(30)).await?;
    let follower = (leader + 1) % 3;
    let op = c.client_with(&[eps[follower].clone()], Some(OPERATOR_TOKEN));
    op.create_vm(&serde_json::from_value(spec_json("secure-1"))?)
        .await?;
    assert_eq!(op.get_vm("secure-1").await?.spec.name, "secure-1");

    // Health is open; everything else needs a token.
    let anon = c.client_with(&eps, None);
    assert_eq!(anon.health().await?.status, "ok");
    let cases = [
        (
            anon.list_vms().await.err().and_then(|e| e.status()),
            Some(401),
            "no token",
        ),
        (
            c.client_with(&eps, Some("not-a-real-token-at-all"))
                .list_vms()
                .await
                .err()
                .and_then(|e| e.status()),
            Some(401),
            "unknown token",
        ),
    ];
    for (got, want, what) in cases {
        assert_eq!(got, want, "{what}");
    }

    // An agent token acts for its own host only.
    let (h1, t1) = AGENT_TOKENS[0];
    let agent = c.client_with(&eps, Some(t1));
    agent.register_host(&process_host(h1)).await?;
    agent.heartbeat(h1).await?;
    agent.assignments(h1, None, Duration::from_secs(1)).await?;
    let other = AGENT_TOKENS[1].0;
    assert_eq!(
        agent
            .register_host(&process_host(other))
            .await
            .err()
            .and_then(|e| e.status()),
        Some(403)
    );
    op.register_host(&process_host(other)).await?;
    assert_eq!(
        agent.heartbeat(other).await.err().and_then(|e| e.status()),
        Some(403)
    );
    assert_eq!(
        agent.list_vms().await.err().and_then(|e| e.status()),
        Some(403)
    );
    assert_eq!(
        agent
            .create_vm(&serde_json::from_value(spec_json("nope"))?)
            .await
            .err()
            .and_then(|e| e.status()),
        Some(403)
    );

    // Peer routes need the peer token: an operator token is not enough.
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(
            c.ca_file().ok_or_else(|| anyhow::anyhow!("no CA"))?,
        )?)?)
        .build()?;
    let forward = |token: &'static str| {
        http.post(format!("{}/raft/forward", eps[0]))
            .bearer_auth(token)
            .json(&serde_json::json!("ReadIndex"))
            .send()
    };
    assert_eq!(forward(OPERATOR_TOKEN).await?.status(), 403);
    assert!(forward(PEER_TOKEN).await?.status().is_success());

    // Without the CA, the client refuses the server's certificate.
    let untrusting = reqwest::Client::builder().build()?;
    assert!(untrusting
        .get(format!("{}/v1/health", eps[0]))
        .send()
        .await
        .is_err());
    // Plain HTTP to a TLS port does not get an answer either.
    let plain = eps[0].replace("https://", "http://");
    assert!(reqwest::Client::new()
        .get(format!("{plain}/v1/health"))
        .send()
        .await
        .is_err());

    // The cluster keeps working through all that (Raft traffic is TLS with peer tokens).
    wait::until(
        "all nodes to report the VM",
        Duration::from_secs(30),
        || async {
            for i in 0..3 {
                let vm = c
                    .node_client(i)
                    .get_vm("secure-1")
                    .await
                    .map_err(|e| e.to_string())?;
                if vm.spec.name != "secure-1" {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn t71_exposed_node_without_tokens_refuses_to_start() -> anyhow::Result<()> {
    let out = std::process::Command::new(blixard_tests::binaries::binary("blixard-control"))
        .args([
            "--node-id",
            "1",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            "/nonexistent-never-created",
        ])
        .args(["--initial-cluster", "1=http://10.0.0.1:7001"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("insecure") && err.contains("TLS"), "{err}");
    Ok(())
}
