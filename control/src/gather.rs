//! Gathering queued requests into batches: whatever is waiting when a batch starts (at most
//! `max`, without waiting for more) goes together, with at most `in_flight` batches out at a
//! time, so a lone request goes at once and a crowd shares one round. Used for proposals
//! (`node::propose_batched`: one log entry) and forwarded heartbeats (`heartbeat_forward`).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

/// Takes batches off `rx` until it closes or `each` returns `None`, and runs the future `each`
/// makes of every batch on its own task.
pub async fn batches<T, F, Fut>(
    mut rx: mpsc::Receiver<T>,
    max: usize,
    in_flight: usize,
    mut each: F,
) where
    F: FnMut(Vec<T>) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(work) = each(batch) else {
            return;
        };
        tokio::spawn(async move {
            work.await;
            drop(permit);
        });
    }
}
