//! The closed-loop load generator shared by every write figure: `clients` workers, each with
//! its own HTTP/1.1 keep-alive connection, each sending its next request as soon as the last
//! one is answered. Bounded twice: by time and by a total operation count. The same code drives
//! Blixard (`POST /v1/vms`) and etcd (`POST /v3/kv/put`, its JSON gateway), with the same
//! payload bytes: etcd stores the VM spec JSON Blixard receives, under a key of similar length.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Barrier;

/// What the load is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `POST /v1/vms` with a VM spec: one durable Raft write per request.
    Blixard,
    /// `POST /v3/kv/put` with the spec's JSON as the value.
    Etcd,
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: Target,
    /// Worker `w` sends to `urls[w % urls.len()]`.
    pub urls: Vec<String>,
    pub clients: usize,
    pub duration: Duration,
    pub max_ops: u64,
    /// Makes names unique across runs (a DNS label fragment).
    pub tag: String,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
    /// Latency of every successful request, microseconds, sorted.
    pub lat_us: Vec<u64>,
}

impl LoadResult {
    pub fn ops_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    /// The `p`-th percentile latency in milliseconds (nearest rank).
    pub fn pct_ms(&self, p: f64) -> f64 {
        percentile_us(&self.lat_us, p) / 1000.0
    }
}

/// Nearest-rank percentile of sorted microsecond samples.
pub fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// The VM spec every write carries (about 80 bytes of JSON).
pub fn vm_body(name: &str) -> String {
    format!(r#"{{"name":"{name}","vcpus":1,"memory_mib":64,"hypervisor":"process"}}"#)
}

fn etcd_body(key: &str, value: &str) -> String {
    format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        base64(key.as_bytes()),
        base64(value.as_bytes())
    )
}

/// Standard base64 with padding (etcd's gateway wants `bytes` fields so).
pub fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A client with one keep-alive connection, as one independent API client would have.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("building an HTTP client: {e}"))
}

/// Sends one write; `Ok(())` when the system acknowledged it.
pub async fn write_once(
    http: &reqwest::Client,
    target: Target,
    url: &str,
    name: &str,
) -> Result<(), String> {
    let (path, body, want) = match target {
        Target::Blixard => ("/v1/vms", vm_body(name), 201),
        Target::Etcd => (
            "/v3/kv/put",
            etcd_body(&format!("/bench/vms/{name}"), &vm_body(name)),
            200,
        ),
    };
    let r = http
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    // Read the body so the connection is reused.
    let _ = r.bytes().await;
    if status == want {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// Runs one closed-loop load and returns what it measured.
pub async fn run(spec: &LoadSpec) -> LoadResult {
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start_line = Arc::new(Barrier::new(spec.clients + 1));
    let mut tasks = Vec::new();
    for w in 0..spec.clients {
        let url = spec.urls[w % spec.urls.len()].clone();
        let issued = issued.clone();
        let errors = errors.clone();
        let start_line = start_line.clone();
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let http = client();
            // Open the connection before the clock starts.
            let _ = write_once(&http, spec.target, &url, &format!("{}-{w}-warm", spec.tag)).await;
            start_line.wait().await;
            let end = Instant::now() + spec.duration;
            let mut lat = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < end && issued.fetch_add(1, Ordering::Relaxed) < spec.max_ops {
                seq += 1;
                let name = format!("{}-{w}-{seq}", spec.tag);
                let t = Instant::now();
                match write_once(&http, spec.target, &url, &name).await {
                    Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            lat
        }));
    }
    start_line.wait().await;
    let t0 = Instant::now();
    let mut lat_us = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            lat_us.extend(l);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    lat_us.sort_unstable();
    LoadResult {
        ops: lat_us.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        secs,
        lat_us,
    }
}

/// Sends `n` POSTs (`make(i)` gives path and JSON body) from `clients` workers as fast as
/// they are answered; returns the wall time and the count of refused requests. Each request
/// is retried a few times on a transport error (a connection reset under load).
pub async fn burst<F>(url: &str, n: u64, clients: usize, make: F) -> (f64, u64)
where
    F: Fn(u64) -> (String, String) + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (make, next, errors, url) =
            (make.clone(), next.clone(), errors.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let http = client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (path, body) = make(i);
                let mut ok = false;
                for _ in 0..5 {
                    match http
                        .post(format!("{url}{path}"))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                    {
                        Ok(r) => {
                            ok = r.status().is_success();
                            let _ = r.bytes().await;
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (t0.elapsed().as_secs_f64(), errors.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_us(&v, 50.0), 50.0);
        assert_eq!(percentile_us(&v, 99.0), 99.0);
        assert_eq!(percentile_us(&v, 100.0), 100.0);
        assert_eq!(percentile_us(&[7], 99.0), 7.0);
    }
}
