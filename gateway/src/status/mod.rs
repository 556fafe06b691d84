//! The shared picture of every supervised component, and of the gateway
//! itself.
//!
//! Supervisors write it on every state transition; the HTTP surface
//! (`/health`, `/gateway/status`, `/metrics`), systemd notifications and the
//! worker's event stream read it. A `watch` channel carries it, so readers can
//! both take a snapshot and wait for the next change without polling.
//!
//! Beside the picture, the board keeps each supervision loop's *heartbeat*:
//! the time by which the loop promised to go round again. The systemd
//! watchdog pings only while every promise is kept, so a supervisor stuck in
//! an await that never ends gets the gateway restarted. Heartbeats live
//! outside the `watch` channel: a loop beats many times a second and must
//! not wake every reader of the picture each time.
//!
//! Layer: imports nothing of the crate; every layer above
//! reports to it. The relay's view (`relay.rs`) is plain data, filled by `relay/`.

pub mod relay;
pub mod repository;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

/// Lifecycle of one child, as SPEC §5 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Started (or being started), not yet passing its readiness check.
    Starting,
    /// Passing health checks; traffic may flow.
    Ready,
    /// Exited, unhealthy or could not start; waiting before the next start.
    /// Retried forever: `attempts` and `next_retry` say how it is going.
    Backoff,
    /// Could not start for a reason no retry can fix (a missing binary, a
    /// cluster of another major version); waits for SIGHUP.
    Failed,
    /// Being stopped on purpose.
    Stopping,
    /// Not running, on purpose (or not started yet).
    Stopped,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Backoff => "backoff",
            State::Failed => "failed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        })
    }
}

/// The gateway's own lifecycle, separate from its children's: a load
/// balancer must see `/health` fail as soon as a stop begins, while the
/// children are still up and in-flight requests drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GatewayState {
    #[default]
    Running,
    /// SIGTERM/SIGINT received: `/health` answers 503, requests drain, children stop.
    Stopping,
}

/// What `/gateway/status` shows for one component.
#[derive(Debug, Clone)]
pub struct Component {
    pub state: State,
    pub pid: Option<u32>,
    /// When the current run became ready; uptime counts from here.
    pub ready_since: Option<Instant>,
    /// Restarts since the gateway started (not counting the first start).
    pub restarts: u32,
    /// How the previous run ended, in words ("exit status 1", "killed by SIGKILL", "failed health checks").
    pub last_exit: Option<String>,
    /// Free-form detail for the current state (e.g. the error that caused `failed`).
    pub detail: Option<String>,
    /// Failed starts or runs in a row without a stable run between them:
    /// the exponent of the restart delay. Back to 0 once a run is stable.
    pub attempts: u32,
    /// While in `backoff`: when the next start is due.
    pub next_retry: Option<Instant>,
    /// `OMNI_CRASH_LOOP_LIMIT` quick failures in a row: alerting material
    /// (`/metrics`); the child is still being retried.
    pub crash_looping: bool,
    /// A reload's new instance is starting beside the one that serves.
    pub reloading: bool,
}

impl Component {
    fn new() -> Self {
        Component {
            state: State::Stopped,
            pid: None,
            ready_since: None,
            restarts: 0,
            last_exit: None,
            detail: None,
            attempts: 0,
            next_retry: None,
            crash_looping: false,
            reloading: false,
        }
    }

    pub fn uptime(&self) -> Option<Duration> {
        self.ready_since.map(|t| t.elapsed())
    }

    /// Time left before the next start, while in backoff.
    pub fn next_retry_in(&self) -> Option<Duration> {
        self.next_retry.map(|t| t.saturating_duration_since(Instant::now()))
    }
}

/// JSON shape of one component in `/gateway/status` and `/health`.
#[derive(Debug, Serialize)]
pub struct ComponentJson<'a> {
    pub name: &'a str,
    pub state: State,
    pub pid: Option<u32>,
    pub uptime_s: Option<f64>,
    pub restarts: u32,
    pub last_exit: Option<&'a str>,
    pub attempts: u32,
    pub next_retry_s: Option<f64>,
    pub crash_looping: bool,
    pub reloading: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    /// The worker's last health answer: whether it holds the leader lock
    /// (runs the scheduled backups for every gateway on the database).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<bool>,
}

/// All components, in start order (PostgreSQL first), and the gateway's own state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub components: Vec<(&'static str, Component)>,
    pub gateway: GatewayState,
    /// The last major upgrade of the cluster (`pg::upgrade::Record::to_json`), shown until its record is gone.
    pub upgrade: Option<serde_json::Value>,
    /// The storage in effect and where each setting came from, for
    /// onboarding's summary (`{"kind", "data_dir", "data_dir_origin", "memory_mode"}`).
    pub storage: Option<serde_json::Value>,
    /// The last point-in-time restore of this run (`pitr::online`): its step
    /// and percentage while it runs, then how it ended.
    pub restore: Option<serde_json::Value>,
}

impl Snapshot {
    pub fn get(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|(n, _)| *n == name).map(|(_, c)| c)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Component)> {
        self.components.iter().map(|(n, c)| (*n, c))
    }
}

/// Handle to the shared status; cheap to clone.
#[derive(Clone)]
pub struct Board {
    tx: watch::Sender<Snapshot>,
    heartbeats: Arc<Mutex<HashMap<&'static str, Instant>>>,
    /// The replication relay's picture, when it runs. Kept beside the
    /// supervised children, not among them: replication is not on the
    /// request path, so it never fails `/health` or holds back readiness.
    replication: Arc<Mutex<Option<Arc<Mutex<crate::status::relay::RelayView>>>>>,
    /// Whether the serving worker leads, from its health answer; `None`
    /// when unknown (no worker serves, or one that does not say).
    leader: Arc<Mutex<Option<bool>>>,
    /// The off-site repository's shipper, when `OMNI_REPOSITORY_URL` is
    /// set: beside the children like the relay (it never fails `/health`;
    /// a problem shows in its `degraded` list).
    repository: Arc<Mutex<Option<Arc<Mutex<crate::status::repository::RepositoryView>>>>>,
}

impl Board {
    pub fn new(names: &[&'static str]) -> Self {
        let snapshot = Snapshot { components: names.iter().map(|n| (*n, Component::new())).collect(), gateway: GatewayState::Running, upgrade: None, storage: None, restore: None };
        Board { tx: watch::Sender::new(snapshot), heartbeats: Arc::default(), replication: Arc::default(), leader: Arc::default(), repository: Arc::default() }
    }

    /// Applies `f` to `name`'s entry and wakes every watcher.
    pub fn update(&self, name: &'static str, f: impl FnOnce(&mut Component)) {
        self.tx.send_modify(|s| match s.components.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => f(c),
            None => {
                let mut c = Component::new();
                f(&mut c);
                s.components.push((name, c));
            }
        });
    }

    /// Moves `name` to `state`, logging the transition.
    pub fn transition(&self, name: &'static str, state: State, detail: Option<String>) {
        self.update(name, |c| {
            if c.state != state {
                match (&detail, state) {
                    (Some(d), State::Failed) => tracing::error!(component = name, "{} → {state}: {d}", c.state),
                    (Some(d), State::Backoff) => tracing::warn!(component = name, "{} → {state}: {d}", c.state),
                    (Some(d), _) => tracing::info!(component = name, "{} → {state}: {d}", c.state),
                    (None, _) => tracing::info!(component = name, "{} → {state}", c.state),
                }
            }
            if state == State::Ready && c.state != State::Ready {
                c.ready_since = Some(Instant::now());
            } else if state != State::Ready {
                c.ready_since = None;
            }
            if state != State::Backoff {
                c.next_retry = None;
            }
            if state != State::Ready {
                c.reloading = false;
            }
            c.state = state;
            c.detail = detail;
        });
    }

    /// Marks the gateway as stopping: from here on `/health` answers 503.
    pub fn set_stopping(&self) {
        self.tx.send_if_modified(|s| {
            let changed = s.gateway != GatewayState::Stopping;
            s.gateway = GatewayState::Stopping;
            changed
        });
    }

    pub fn gateway(&self) -> GatewayState {
        self.tx.borrow().gateway
    }

    pub fn snapshot(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    pub fn state(&self, name: &str) -> Option<State> {
        self.tx.borrow().get(name).map(|c| c.state)
    }

    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }

    /// True when every component that serves requests is ready (an
    /// [`AUXILIARY`] one is shown, but does not hold readiness back).
    pub fn all_ready(&self) -> bool {
        self.tx.borrow().iter().all(|(n, c)| c.state == State::Ready || is_auxiliary(n))
    }

    /// The supervision loop of `name` promises to beat again within `within`.
    pub fn beat(&self, name: &'static str, within: Duration) {
        self.heartbeats.lock().unwrap_or_else(|e| e.into_inner()).insert(name, Instant::now() + within);
    }

    /// The supervision loop of `name` has ended: no promise to keep any more.
    pub fn unwatch(&self, name: &'static str) {
        self.heartbeats.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// Supervision loops that broke their promise to beat by `now`.
    pub fn stalled(&self, now: Instant) -> Vec<&'static str> {
        let beats = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
        stalled(beats.iter().map(|(n, d)| (*n, *d)), now)
    }

    /// Records the storage in effect for `/gateway/status`.
    pub fn set_storage(&self, storage: serde_json::Value) {
        self.tx.send_modify(|s| s.storage = Some(storage));
    }

    /// Records the cluster's last major upgrade for `/gateway/status`.
    pub fn set_upgrade(&self, upgrade: serde_json::Value) {
        self.tx.send_modify(|s| s.upgrade = Some(upgrade));
    }

    /// Records a point-in-time restore's progress for `/gateway/status`.
    pub fn set_restore(&self, restore: serde_json::Value) {
        self.tx.send_modify(|s| s.restore = Some(restore));
    }

    /// Shows the replication relay's picture in `/gateway/status` and `/metrics`.
    pub fn set_replication(&self, view: Arc<Mutex<crate::status::relay::RelayView>>) {
        *self.replication.lock().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }

    /// The replication relay's picture now, when it runs.
    pub fn replication(&self) -> Option<crate::status::relay::RelayView> {
        let view = self.replication.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let v = view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(v)
    }

    /// Shows the off-site repository's picture in `/gateway/status`, `/health` and `/metrics`.
    pub fn set_repository(&self, view: Arc<Mutex<crate::status::repository::RepositoryView>>) {
        *self.repository.lock().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }

    /// The off-site repository's picture now, when one is configured.
    pub fn repository(&self) -> Option<crate::status::repository::RepositoryView> {
        let view = self.repository.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let v = view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(v)
    }

    /// Records whether the serving worker leads, logging a change.
    pub fn set_leader(&self, leader: Option<bool>) {
        let mut current = self.leader.lock().unwrap_or_else(|e| e.into_inner());
        if *current != leader {
            match leader {
                Some(true) => tracing::info!("this gateway's worker leads: scheduled backups run here"),
                Some(false) => tracing::info!("this gateway's worker follows: another gateway's worker runs the scheduled backups"),
                None => {}
            }
            *current = leader;
        }
    }

    /// The `/gateway/status` document.
    pub fn to_json(&self) -> serde_json::Value {
        self.snapshot_and_json().1
    }

    /// One snapshot and the document made from it: a reader that decides
    /// on the snapshot (`/health`) shows the same moment it decided on.
    pub fn snapshot_and_json(&self) -> (Snapshot, serde_json::Value) {
        let snap = self.snapshot();
        let mut doc = self.children_json(&snap);
        if let (Some(relay), Some(list)) = (self.replication(), doc["components"].as_array_mut()) {
            list.push(relay.to_json());
        }
        if let Some(repository) = self.repository() {
            doc["repository"] = repository.to_json();
            // Serving is unaffected: `/health` stays 200 and lists it here.
            if let Some(why) = repository.degraded() {
                doc["degraded"] = serde_json::json!([why]);
            }
        }
        (snap, doc)
    }

    fn children_json(&self, snap: &Snapshot) -> serde_json::Value {
        let tenths = |d: Duration| (d.as_secs_f64() * 10.0).round() / 10.0;
        let leader = *self.leader.lock().unwrap_or_else(|e| e.into_inner());
        let components: Vec<_> = snap
            .iter()
            .map(|(name, c)| ComponentJson {
                name,
                state: c.state,
                pid: c.pid,
                uptime_s: c.uptime().map(tenths),
                restarts: c.restarts,
                last_exit: c.last_exit.as_deref(),
                attempts: c.attempts,
                next_retry_s: c.next_retry_in().map(tenths),
                crash_looping: c.crash_looping,
                reloading: c.reloading,
                detail: c.detail.as_deref(),
                leader: if name == "api" { leader } else { None },
            })
            .collect();
        let mut doc = serde_json::json!({ "gateway": { "state": snap.gateway }, "components": components });
        if let Some(upgrade) = &snap.upgrade {
            doc["upgrade"] = upgrade.clone();
        }
        if let Some(storage) = &snap.storage {
            doc["storage"] = storage.clone();
        }
        if let Some(restore) = &snap.restore {
            doc["restore"] = restore.clone();
        }
        doc
    }
}

/// Components whose outage does not stop the gateway from serving: the WAL
/// streamer (point-in-time recovery degrades, PostgreSQL keeps serving;
/// `/gateway/status` and the log say so, `/health` stays 200).
pub const AUXILIARY: &[&str] = &["wal"];

pub fn is_auxiliary(name: &str) -> bool {
    AUXILIARY.contains(&name)
}

/// The watchdog's decision: which loops missed the deadline they promised.
/// Empty means every supervision loop is making progress and systemd may be
/// told so.
pub fn stalled(deadlines: impl IntoIterator<Item = (&'static str, Instant)>, now: Instant) -> Vec<&'static str> {
    let mut late: Vec<_> = deadlines.into_iter().filter(|(_, deadline)| *deadline < now).map(|(n, _)| n).collect();
    late.sort_unstable();
    late
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_stalled_only_once_its_promise_has_passed() {
        let now = Instant::now();
        let beats = [("postgres", now + Duration::from_secs(1)), ("api", now - Duration::from_millis(1))];
        assert_eq!(stalled(beats, now), ["api"]);
        assert!(stalled([("postgres", now)], now).is_empty(), "a deadline of exactly now is still kept");
        assert!(stalled([], now).is_empty(), "no loops, nothing stalled");
    }

    #[test]
    fn board_heartbeats_are_forgotten_when_a_loop_ends() {
        let board = Board::new(&["api"]);
        board.beat("api", Duration::ZERO);
        let later = Instant::now() + Duration::from_millis(1);
        assert_eq!(board.stalled(later), ["api"]);
        board.unwatch("api");
        assert!(board.stalled(later).is_empty());
    }

    #[test]
    fn status_shows_backoff_progress_and_the_gateway_state() {
        let board = Board::new(&["api"]);
        board.update("api", |c| {
            c.attempts = 7;
            c.crash_looping = true;
            c.last_exit = Some("killed by SIGKILL".into());
        });
        board.transition("api", State::Backoff, Some("attempt 7, next in 12 s, last: killed by SIGKILL".into()));
        board.update("api", |c| c.next_retry = Some(Instant::now() + Duration::from_secs(12)));
        let doc = board.to_json();
        let api = &doc["components"][0];
        assert_eq!(api["state"], "backoff");
        assert_eq!(api["attempts"], 7);
        assert_eq!(api["crash_looping"], true);
        let next = api["next_retry_s"].as_f64().unwrap();
        assert!((11.0..=12.0).contains(&next), "{next}");
        assert_eq!(doc["gateway"]["state"], "running");
        board.set_stopping();
        assert_eq!(board.to_json()["gateway"]["state"], "stopping");
        board.transition("api", State::Starting, None);
        assert!(board.to_json()["components"][0]["next_retry_s"].is_null(), "only a backoff has a next retry");
    }
}
