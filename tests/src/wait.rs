//! Waiting on conditions with a deadline, never on fixed sleeps.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 20–200 ms until it returns `Some`, or fails after `deadline` with
/// `what` and the last observation in the message.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_string(),
            Err(e) => e,
        };
        if start.elapsed() > deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
