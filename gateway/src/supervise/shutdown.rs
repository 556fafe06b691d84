//! The gateway's one way to stop: a stop is asked once, then the stages
//! stop one after the other, in a fixed order.
//!
//! Every task the gateway starts runs on the [`TaskTracker`] of one
//! [`Stage`] and is told to stop by that stage's [`CancellationToken`]; a
//! stage's token is a child of the root token, which is cancelled only to
//! hurry (a second Ctrl-C) and at the very end. [`Shutdown::stop`] cancels
//! the stages in order, each waited for within its grace, so what depends on
//! something is stopped before it (the HTTP drain before the worker, the
//! worker before PostgreSQL).
//!
//! [`Shutdown::asked`] is cancelled the moment a stop is asked, before any
//! stage stops: work that must not begin any more watches it (a base
//! backup, a restore drill, the next step of a long preparation such as a
//! major upgrade).

use std::fmt;
use std::future::Future;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::process::child::{self, ChildSpec};

/// A child stopped by [`run_unless_stopped`] gets this long after SIGTERM
/// before its process group is killed.
const STOPPED_CHILD_GRACE: Duration = Duration::from_secs(5);

/// A step that ended because a stop was asked, not because it failed:
/// the gateway then exits as it would after any stop, and says where it
/// stopped. Found anywhere in an error's chain by [`is_stopped`].
#[derive(Debug)]
pub struct Stopped {
    /// What was under way, e.g. `pg_upgrade`.
    pub during: String,
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stopped as asked during {}", self.during)
    }
}

impl std::error::Error for Stopped {}

/// How a long preparation (a major upgrade, a restore resumed) answers
/// stop signals: the first Ctrl-C only asks, since stopping throws away
/// the work done so far; a second one, or a SIGTERM (a service manager
/// cannot answer a question), stops it at its next safe step.
#[derive(Default)]
pub struct AskOnce {
    asked: bool,
}

impl AskOnce {
    /// True when `signal` (`SIGINT`, `SIGTERM`) is to stop `what` now.
    pub fn stops(&mut self, signal: &str, what: &str) -> bool {
        if signal == "SIGINT" && !std::mem::replace(&mut self.asked, true) {
            tracing::warn!(
                "Ctrl-C while {what}: it goes on. Stopping throws away what it has done so far (it is rolled back, or resumed at the next start), \
                 so it is only done on request: press Ctrl-C again to stop it at its next safe step"
            );
            return false;
        }
        tracing::warn!("{signal} received while {what}: stopping at the next safe step");
        true
    }
}

/// A token cancelled when SIGINT/SIGTERM ask to stop `what` (a command
/// such as `omni-gateway upgrade`), answered as [`AskOnce`] does.
pub fn stop_on_signals(what: &'static str) -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let mut ask = AskOnce::default();
        loop {
            let name = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
            if ask.stops(name, what) {
                token.cancel();
                return;
            }
        }
    });
    Ok(stop)
}

/// `Err(Stopped)` when a stop was asked through `stop`: called between the
/// steps of a long preparation, so it ends at the next step.
pub fn check(stop: &CancellationToken, next: &str) -> anyhow::Result<()> {
    if stop.is_cancelled() {
        return Err(Stopped { during: format!("{next} (before it began)") }.into());
    }
    Ok(())
}

/// Whether `error` is (or was caused by) a [`Stopped`].
pub fn is_stopped(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<Stopped>())
}

/// Runs a short-lived child (initdb, `pg_upgrade`) to its end, unless a
/// stop is asked first through `stop`: its process group then gets
/// SIGTERM, SIGKILL [`STOPPED_CHILD_GRACE`] later, and the call ends in
/// [`Stopped`] once the child is gone. For steps whose caller can undo or
/// resume what the child left half done.
pub async fn run_unless_stopped(spec: ChildSpec, stop: &CancellationToken) -> anyhow::Result<ExitStatus> {
    let during = spec.name.clone();
    let mut running = child::spawn(spec).await?;
    let pid = running.id();
    let status = tokio::select! {
        status = running.wait() => status,
        () = stop.cancelled() => {
            tracing::info!("stopping {during} (process group {})", pid.unwrap_or(0));
            if let Some(pid) = pid {
                child::signal_group(pid, Signal::SIGTERM);
            }
            if tokio::time::timeout(STOPPED_CHILD_GRACE, running.wait()).await.is_err() {
                if let Some(pid) = pid {
                    child::signal_group(pid, Signal::SIGKILL);
                }
                let _ = running.wait().await;
            }
            if let Some(pid) = pid {
                child::forget(pid);
            }
            return Err(Stopped { during }.into());
        }
    };
    if let Some(pid) = pid {
        child::forget(pid);
    }
    Ok(status?)
}

/// One group of tasks that stop together.
#[derive(Clone)]
pub struct Stage {
    pub name: &'static str,
    /// What it is, for the log: "the API worker".
    what: &'static str,
    token: CancellationToken,
    /// Cancelled once the gateway's stop is asked, before any stage stops.
    asked: CancellationToken,
    /// The root token: cancelled to hurry, and once every stage has stopped.
    root: CancellationToken,
    tasks: TaskTracker,
    grace: Duration,
    /// The runtime the stages were made on (the main one): [`Stage::spawn`]
    /// runs tasks there even when asked from an HTTP thread's runtime,
    /// whose tasks end with their connections.
    runtime: Option<tokio::runtime::Handle>,
}

impl Stage {
    /// Cancelled when this stage is to stop.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Cancelled once the gateway's stop is asked (before this stage's own
    /// token, which waits for the stages before it).
    pub fn asked(&self) -> CancellationToken {
        self.asked.clone()
    }

    /// Cancelled to hurry (a second stop signal), and at the very end:
    /// work a stage lets finish after its token (a base backup, a restore
    /// under way) is abandoned then.
    pub fn hurried(&self) -> CancellationToken {
        self.root.clone()
    }

    /// The stage's tasks, for code that spawns its own (a supervisor's).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            Some(runtime) => self.tasks.spawn_on(task, runtime),
            None => self.tasks.spawn(task),
        }
    }
}

/// The stages, in stop order, and the tokens above them.
pub struct Shutdown {
    asked: CancellationToken,
    root: CancellationToken,
    stages: Vec<Stage>,
}

impl Shutdown {
    /// `stages` in the order they stop: a name, what it is (for the log),
    /// and how long its tasks may take once told (a supervisor's own stop
    /// signals and timeouts, the HTTP drain, a base backup allowed to finish).
    pub fn new(stages: &[(&'static str, &'static str, Duration)]) -> Shutdown {
        let (asked, root) = (CancellationToken::new(), CancellationToken::new());
        let runtime = tokio::runtime::Handle::try_current().ok();
        let stages = stages
            .iter()
            .map(|&(name, what, grace)| Stage { name, what, token: root.child_token(), asked: asked.clone(), root: root.clone(), tasks: TaskTracker::new(), grace, runtime: runtime.clone() })
            .collect();
        Shutdown { asked, root, stages }
    }

    /// The stage called `name`. Stage names are fixed in code: an unknown
    /// one is a bug, not an input.
    pub fn stage(&self, name: &str) -> &Stage {
        self.stages.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no shutdown stage {name:?}"))
    }

    /// Cancelled once a stop is asked, before any stage stops.
    pub fn asked(&self) -> CancellationToken {
        self.asked.clone()
    }

    pub fn ask(&self) {
        self.asked.cancel();
    }

    /// Cancelled to hurry: every stage at once, no grace waited out.
    pub fn hurried(&self) -> CancellationToken {
        self.root.clone()
    }

    /// Stops every stage at once and stops waiting for graces (a second
    /// stop signal). Children are still stopped by their supervisors.
    pub fn hurry(&self) {
        self.asked.cancel();
        self.root.cancel();
    }

    /// Stops the stages in order: each is told, then waited for within its
    /// grace (cut short by [`Shutdown::hurry`]); a stage still running
    /// after it is logged and left behind, and the next one stops anyway.
    /// Returns the names of the stages with tasks still running.
    pub async fn stop(&self) -> Vec<&'static str> {
        self.asked.cancel();
        let mut late = Vec::new();
        for stage in &self.stages {
            if !stage.tasks.is_empty() {
                tracing::info!("stopping {}", stage.what);
            }
            stage.token.cancel();
            stage.tasks.close();
            if stage.tasks.is_empty() {
                continue;
            }
            // Hurried: every stage was told at once, and none is waited
            // for here ([`Shutdown::drained`] gives them a last moment).
            let done = tokio::select! {
                biased;
                () = self.root.cancelled() => stage.tasks.is_empty(),
                () = stage.tasks.wait() => true,
                () = tokio::time::sleep(stage.grace) => false,
            };
            if !done {
                late.push(stage.name);
                if !self.root.is_cancelled() {
                    tracing::warn!("{}: {} tasks still running {} s after the stop; going on", stage.what, stage.tasks.len(), stage.grace.as_secs());
                }
            }
        }
        self.root.cancel();
        late
    }

    /// After [`Shutdown::stop`]: waits up to `grace` for the tasks left
    /// behind; false if some still run.
    pub async fn drained(&self, grace: Duration) -> bool {
        let all = async {
            for stage in &self.stages {
                stage.tasks.wait().await;
            }
        };
        tokio::time::timeout(grace, all).await.is_ok()
    }

    /// Tasks still running, over every stage.
    pub fn running(&self) -> usize {
        self.stages.iter().map(|s| s.tasks.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn stages_stop_in_order_each_after_the_one_before_is_done() {
        let shutdown = Shutdown::new(&[("first", "the first", Duration::from_secs(5)), ("second", "the second", Duration::from_secs(5))]);
        let order = Arc::new(Mutex::new(Vec::new()));
        for name in ["second", "first"] {
            let (stage, order) = (shutdown.stage(name).clone(), order.clone());
            stage.clone().spawn(async move {
                stage.token().cancelled().await;
                // The first stage takes a while to stop: the second must wait for it.
                if name == "first" {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                order.lock().unwrap().push(name);
            });
        }
        assert!(shutdown.stop().await.is_empty());
        assert_eq!(*order.lock().unwrap(), ["first", "second"]);
        assert!(shutdown.asked().is_cancelled());
    }

    #[tokio::test]
    async fn a_stage_past_its_grace_is_left_behind_and_the_next_stops_anyway() {
        let shutdown = Shutdown::new(&[("stuck", "the stuck one", Duration::from_millis(50)), ("next", "the next", Duration::from_secs(5))]);
        shutdown.stage("stuck").spawn(std::future::pending::<()>());
        let next = shutdown.stage("next").clone();
        let stopped = next.spawn({
            let token = next.token();
            async move { token.cancelled().await }
        });
        assert_eq!(shutdown.stop().await, ["stuck"]);
        assert!(stopped.is_finished());
        assert!(!shutdown.drained(Duration::from_millis(10)).await);
        assert_eq!(shutdown.running(), 1);
    }

    #[tokio::test]
    async fn hurrying_cuts_every_grace_short() {
        let shutdown = Arc::new(Shutdown::new(&[("slow", "the slow one", Duration::from_secs(3600))]));
        shutdown.stage("slow").spawn(std::future::pending::<()>());
        let stop = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.stop().await }
        });
        shutdown.hurry();
        let late = tokio::time::timeout(Duration::from_secs(5), stop).await.expect("hurried stop returns at once").unwrap();
        assert_eq!(late, ["slow"]);
        assert!(shutdown.stage("slow").token().is_cancelled());
    }
}
