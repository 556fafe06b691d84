//! Memory given back to the system once a burst of traffic is over.
//!
//! glibc's malloc keeps what a burst freed (its arenas' free chunks, and
//! the top of each heap below its trim threshold) for the next allocation:
//! after 1,000 connections' handshakes and first requests it held 7–10 MiB
//! that `malloc_trim` returns (BENCHMARKS.md, "HTTPS: where an idle
//! connection's memory goes"). A long-running gateway that saw one burst
//! would otherwise keep that for good. So once a second the proxy's request
//! counter is read, and after a request `malloc_trim(0)` runs (on a blocking
//! thread: it walks every arena) at the first second without one; again
//! once the quiet HTTPS connections have given their buffers back
//! (`park.rs`) and the pool to the worker has closed a burst's surplus
//! (`upstream.rs`), [`PARKED_TRIM`]; and once more [`LATE_TRIM`] later if
//! it stays quiet, when the pool has closed every connection idle past its
//! timeout (`POOL_IDLE_TIMEOUT`). Whatever those free would otherwise stay
//! with malloc. Under steady traffic it never runs; while idle, three times.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::serve::metrics::Metrics;

/// How often the request counter is read.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A trim once the quiet HTTPS connections are parked (`park.rs`: after a
/// second without a byte) and the pool to the worker has closed a burst's
/// surplus (`upstream.rs`: after two seconds, checked every second), in
/// quiet seconds.
const PARKED_TRIM: u32 = 4;
/// The last trim, in quiet seconds: past the pool's idle timeout (20 s)
/// and its eviction pass (every second).
const LATE_TRIM: u32 = 32;

/// Quiet seconds after the last request (`None`: no request since the
/// gateway started), updated by one reading of the request counter, and
/// whether to trim now.
fn step(quiet: Option<u32>, moved: bool) -> (Option<u32>, bool) {
    if moved {
        return (Some(0), false);
    }
    match quiet {
        None => (None, false),
        Some(q) => {
            let q = q.saturating_add(1);
            (Some(q), q == 1 || q == PARKED_TRIM || q == LATE_TRIM)
        }
    }
}

/// Starts the check; it ends with `stop`.
pub fn spawn(metrics: Arc<Metrics>, tasks: &TaskTracker, stop: CancellationToken) {
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut previous = metrics.counters().requests;
        let mut quiet = None;
        while stop.run_until_cancelled(tick.tick()).await.is_some() {
            let now = metrics.counters().requests;
            let trim;
            (quiet, trim) = step(quiet, now != previous);
            previous = now;
            if trim {
                let _ = tokio::task::spawn_blocking(release).await;
            }
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release() {
    // SAFETY: malloc_trim only walks and shrinks malloc's own arenas; it is
    // thread-safe (each arena is locked while it is trimmed).
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released = released != 0, "returned freed memory to the system after a burst");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() {}

#[cfg(test)]
mod tests {
    use super::{step, LATE_TRIM};

    /// Runs `step` over readings (`true`: requests came in that second) and
    /// returns the seconds (from 1) at which it trims.
    fn trims(readings: impl IntoIterator<Item = bool>) -> Vec<usize> {
        let mut quiet = None;
        let mut at = Vec::new();
        for (i, moved) in readings.into_iter().enumerate() {
            let trim;
            (quiet, trim) = step(quiet, moved);
            if trim {
                at.push(i + 1);
            }
        }
        at
    }

    #[test]
    fn trims_at_the_first_quiet_second_once_parked_and_once_more_later_never_while_traffic_flows() {
        let late = LATE_TRIM as usize;
        // Idle from the start: nothing to give back.
        assert_eq!(trims([false; 100]), Vec::<usize>::new());
        // Steady traffic: never.
        assert_eq!(trims([true; 100]), Vec::<usize>::new());
        // A burst in seconds 1-3, then quiet: at second 4, once its connections are parked, and LATE_TRIM quiet seconds after the burst.
        let burst = [true, true, true].into_iter().chain([false; 100]);
        assert_eq!(trims(burst), vec![4, 7, 3 + late]);
        // Traffic again before the late trim: it starts over from the new quiet.
        let twice = [true].into_iter().chain([false; 10]).chain([true]).chain([false; 100]);
        assert_eq!(trims(twice), vec![2, 5, 13, 16, 12 + late]);
    }
}
