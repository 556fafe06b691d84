//! The shared picture of every supervised component.
//!
//! Supervisors write it on every state transition; the HTTP surface
//! (`/health`, `/gateway/status`, `/metrics`), systemd notifications and the
//! worker's event stream read it. A `watch` channel carries it, so readers can
//! both take a snapshot and wait for the next change without polling.

use std::fmt;
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
    /// Exited or unhealthy; waiting before the next start.
    Backoff,
    /// Crashed too often in a row; left stopped until the gateway restarts (or SIGHUP for the worker).
    Failed,
    /// Being stopped on purpose.
    Stopping,
    /// Not running, on purpose.
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
}

impl Component {
    fn new() -> Self {
        Component { state: State::Stopped, pid: None, ready_since: None, restarts: 0, last_exit: None, detail: None }
    }

    pub fn uptime(&self) -> Option<Duration> {
        self.ready_since.map(|t| t.elapsed())
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

/// All components, in start order (PostgreSQL first).
#[derive(Debug, Clone, Default)]
pub struct Snapshot(pub Vec<(&'static str, Component)>);

impl Snapshot {
    pub fn get(&self, name: &str) -> Option<&Component> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, c)| c)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Component)> {
        self.0.iter().map(|(n, c)| (*n, c))
    }
}

/// Handle to the shared status; cheap to clone.
#[derive(Clone)]
pub struct Board {
    tx: watch::Sender<Snapshot>,
}

impl Board {
    pub fn new(names: &[&'static str]) -> Self {
        let snapshot = Snapshot(names.iter().map(|n| (*n, Component::new())).collect());
        Board { tx: watch::Sender::new(snapshot) }
    }

    /// Applies `f` to `name`'s entry and wakes every watcher.
    pub fn update(&self, name: &'static str, f: impl FnOnce(&mut Component)) {
        self.tx.send_modify(|s| match s.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => f(c),
            None => {
                let mut c = Component::new();
                f(&mut c);
                s.0.push((name, c));
            }
        });
    }

    /// Moves `name` to `state`, logging the transition.
    pub fn transition(&self, name: &'static str, state: State, detail: Option<String>) {
        self.update(name, |c| {
            if c.state != state {
                match (&detail, state) {
                    (Some(d), State::Failed) => tracing::error!(component = name, "{} → {state}: {d}", c.state),
                    (Some(d), _) => tracing::info!(component = name, "{} → {state}: {d}", c.state),
                    (None, _) => tracing::info!(component = name, "{} → {state}", c.state),
                }
            }
            if state == State::Ready && c.state != State::Ready {
                c.ready_since = Some(Instant::now());
            } else if state != State::Ready {
                c.ready_since = None;
            }
            c.state = state;
            c.detail = detail;
        });
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

    /// True when every component is ready.
    pub fn all_ready(&self) -> bool {
        self.tx.borrow().iter().all(|(_, c)| c.state == State::Ready)
    }

    /// Waits until `name` is ready; returns `Err` with the state if it failed or stopped first.
    pub async fn wait_ready(&self, name: &str) -> Result<(), State> {
        let mut rx = self.tx.subscribe();
        loop {
            match rx.borrow_and_update().get(name).map(|c| c.state) {
                Some(State::Ready) => return Ok(()),
                Some(State::Failed) => return Err(State::Failed),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(State::Stopped);
            }
        }
    }

    /// The `/gateway/status` document.
    pub fn to_json(&self) -> serde_json::Value {
        let snap = self.tx.borrow();
        let components: Vec<_> = snap
            .iter()
            .map(|(name, c)| ComponentJson {
                name,
                state: c.state,
                pid: c.pid,
                uptime_s: c.uptime().map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
                restarts: c.restarts,
                last_exit: c.last_exit.as_deref(),
                detail: c.detail.as_deref(),
            })
            .collect();
        serde_json::json!({ "components": components })
    }
}
