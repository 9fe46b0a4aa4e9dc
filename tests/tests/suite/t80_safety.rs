//! Abuse and damage, against real control nodes: per-client rate limits, a corrupted node
//! rebuilt from its peers, a full disk.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blixard_api::{Capacity, HostRegistration, Hypervisor};
use blixard_tests::binaries::binary;
use blixard_tests::cluster::{Cluster, ClusterOptions, AGENT_TOKENS, OPERATOR_TOKEN};
use blixard_tests::wait;

fn registration(id: &str) -> HostRegistration {
    HostRegistration {
        id: id.into(),
        address: String::new(),
        capacity: Capacity {
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 10,
            kvm: false,
        },
        labels: Default::default(),
        hypervisors: vec![Hypervisor::Process],
    }
}

/// Sends `n` requests at once from `client`; returns (succeeded, refused with 429).
async fn burst(client: &blixard_api::Client, n: usize) -> (usize, usize) {
    let calls = (0..n).map(|_| client.cluster_status());
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let limited = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .err()
                .is_some_and(|e| e.status() == Some(429) && e.code() == Some("rate_limited"))
        })
        .count();
    (ok, limited)
}

/// A low per-client limit: a burst from one operator gets 429s with `Retry-After` and the
/// error JSON, another principal (an agent) and the health probe are not affected, the
/// operator passes again once its bucket refills, refusals are counted in /metrics, and
/// `blixardctl` says what happened and exits 7.
#[tokio::test]
async fn t80_rate_limit_is_per_client() -> anyhow::Result<()> {
    let c = Cluster::start_with(
        3,
        ClusterOptions {
            secure: true,
            extra_args: ["--rate-limit-per-sec", "10", "--rate-limit-burst", "20"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        },
    )
    .await?;
    let eps = c.endpoints();
    let node0 = [eps[0].clone()];
    let op = c.client_with(&node0, Some(OPERATOR_TOKEN));

    // 100 requests at once against a burst of 20 and 10/s: most are refused.
    let (ok, limited) = burst(&op, 100).await;
    eprintln!("operator burst: {ok} passed, {limited} refused");
    assert!(ok >= 1 && limited >= 30, "{ok} passed, {limited} refused");

    // The refusal itself: 429, Retry-After, the usual error body.
    let ca = c.ca_file().ok_or_else(|| anyhow::anyhow!("no CA"))?;
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(&ca)?)?)
        .build()?;
    let mut refused = None;
    for _ in 0..300 {
        let r = http
            .get(format!("{}/v1/cluster/status", eps[0]))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await?;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.ok_or_else(|| anyhow::anyhow!("300 requests in a row and no 429"))?;
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Retry-After in {:?}", r.headers()))?;
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    let body: serde_json::Value = r.json().await?;
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("too many requests")),
        "{body}"
    );

    // Another principal, right away: an agent is not throttled by the operator's flood, and
    // neither is the (exempt) health probe.
    let (h1, t1) = AGENT_TOKENS[0];
    let agent = c.client_with(&node0, Some(t1));
    agent.register_host(&registration(h1)).await?;
    agent.heartbeat(h1).await?;
    for _ in 0..30 {
        c.client_with(&node0, None).health().await?;
    }

    // Once the bucket refills, the operator passes again.
    wait::until(
        "the operator to be served again",
        Duration::from_secs(30),
        || async {
            match op.cluster_status().await {
                Ok(_) => Ok(Some(())),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;

    // Refusals are counted by kind of client.
    let metrics = wait::until("/metrics to answer", Duration::from_secs(30), || async {
        let r = http
            .get(format!("{}/metrics", eps[0]))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("HTTP {}", r.status()));
        }
        r.text().await.map(Some).map_err(|e| e.to_string())
    })
    .await?;
    let counted: f64 = metrics
        .lines()
        .find(|l| l.starts_with("blixard_api_rate_limited_total{client=\"operator\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no rate-limit counter in /metrics:\n{metrics}"))?;
    assert!(counted >= 30.0, "counted {counted}");
    assert!(
        metrics.contains("status=\"429\""),
        "429s in the request counts"
    );

    // Callers without a token are limited by address: the CLI, sent without one while an
    // anonymous flood keeps that bucket empty, gets a 429 and says so.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, sent, http, url) = (
            stop.clone(),
            sent.clone(),
            http.clone(),
            format!("{}/v1/cluster/status", eps[0]),
        );
        tokio::spawn(async move {
            // Bounded: stops when told, or after 5000 requests.
            while !stop.load(Ordering::Relaxed) && sent.fetch_add(1, Ordering::Relaxed) < 5000 {
                let _ = http.get(&url).send().await;
            }
        })
    };
    let cli = tokio::task::spawn_blocking({
        let (ep, ca) = (eps[0].clone(), ca.clone());
        move || {
            for _ in 0..20 {
                let out = std::process::Command::new(binary("blixardctl"))
                    .env("BLIXARD_ENDPOINTS", &ep)
                    .env("BLIXARD_CA_FILE", &ca)
                    .env_remove("BLIXARD_TOKEN_FILE")
                    .args(["cluster", "status"])
                    .output();
                if let Ok(o) = out {
                    if o.status.code() == Some(7) {
                        return Some(String::from_utf8_lossy(&o.stderr).into_owned());
                    }
                }
            }
            None
        }
    })
    .await?;
    // The operator, a different client, is served meanwhile (once its own bucket, emptied
    // above, has a token again).
    let served = wait::until(
        "the operator to be served during the flood",
        Duration::from_secs(10),
        || async { Ok(op.cluster_status().await.ok().map(|_| ())) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    flood.await?;
    served?;
    let stderr = cli.ok_or_else(|| anyhow::anyhow!("blixardctl never exited 7 (429)"))?;
    assert!(
        stderr.contains("too many requests") && stderr.contains("retry in"),
        "{stderr}"
    );
    Ok(())
}
