//! A start gate: while someone holds it, the supervised starts that wait on
//! it wait (a point-in-time restore holds the starts of PostgreSQL and of
//! the WAL streamer while it swaps the data directory). The gate knows
//! nothing of why it is held; the holder says so when it is made.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Clone)]
pub struct StartGate {
    lock: Arc<Mutex<()>>,
    /// What holds it, for the log line of a start that waits: "the point-in-time restore in progress".
    holder: &'static str,
}

impl StartGate {
    pub fn new(holder: &'static str) -> StartGate {
        StartGate { lock: Arc::default(), holder }
    }

    /// Returns once the gate is not held (at once when it is not).
    pub async fn wait(&self, what: &str) {
        if self.lock.try_lock().is_err() {
            tracing::info!("{what} starts once {} is done", self.holder);
        }
        drop(self.lock.lock().await);
    }

    /// Holds the gate until the guard is dropped.
    pub async fn hold(&self) -> OwnedMutexGuard<()> {
        self.lock.clone().lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_start_waits_while_the_gate_is_held_and_goes_once_it_is_released() {
        let gate = StartGate::new("a test");
        gate.wait("free").await;
        let held = gate.hold().await;
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait("held").await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a start went on while the gate was held");
        drop(held);
        waiter.await.unwrap();
    }
}
