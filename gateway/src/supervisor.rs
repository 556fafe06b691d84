//! One supervision mechanism for every child.
//!
//! PostgreSQL and the API worker are supervised by the same loop; they differ
//! only by a [`Policy`] value: how to start one run, how to check it, how to
//! stop it. The loop is an explicit state machine over [`State`]:
//!
//! ```text
//!   Starting ──ready check passes──▶ Ready ──exit / failed liveness──▶ Backoff ──delay──▶ Starting
//!      │                                                                  │
//!      └──exit / start timeout──▶ Backoff          too many quick crashes └──▶ Failed
//!   (any state) ──stop requested──▶ Stopping ──▶ Stopped
//! ```
//!
//! Readiness (first passing check of a run) gates traffic; liveness (checks
//! while ready) drives restarts, after `failures_before_restart` misses in a
//! row so one slow query does not bounce the database. Restart delays grow
//! exponentially with jitter and reset once a run stays up for
//! `stable_after`; `crash_loop_limit` quick crashes in a row end in `Failed`,
//! which stays visible instead of spinning.

use std::future::Future;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;
use rand::Rng;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::child;
use crate::config::RestartPolicy;
use crate::status::{Board, State};

/// After a reload switches traffic, how long the old instance keeps
/// accepting before it is told to drain.
const RELOAD_QUIESCE: Duration = Duration::from_millis(300);

/// How to stop a child: a polite signal, then a firmer one, then SIGKILL to
/// its whole process group.
#[derive(Debug, Clone, Copy)]
pub struct StopSignals {
    pub first: Signal,
    /// Sent if the child is still running `grace` after `first`.
    pub second: Option<Signal>,
    pub grace: Duration,
}

/// Timing of health checks.
#[derive(Debug, Clone, Copy)]
pub struct CheckTiming {
    /// Between checks while waiting for readiness.
    pub ready_poll: Duration,
    /// Longest a run may take to become ready before it is restarted.
    pub start_timeout: Duration,
    /// Between liveness checks once ready.
    pub live_interval: Duration,
    /// Longest one check may take.
    pub check_timeout: Duration,
    pub failures_before_restart: u32,
}

/// What differs between children.
pub trait Policy: Send + 'static {
    /// Name in logs and status, e.g. `postgres`.
    fn name(&self) -> &'static str;
    /// Starts one run (preflight checks included).
    fn start(&mut self) -> impl Future<Output = Result<Child>> + Send;
    /// One health check: `Ok` means healthy.
    fn check(&mut self) -> impl Future<Output = Result<()>> + Send;
    fn stop_signals(&self) -> StopSignals;
    fn timing(&self) -> CheckTiming;
    /// Called after a run became ready (e.g. to create the app database, or
    /// to route traffic to a new worker).
    fn on_ready(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// Called when a run ends, whatever the reason (e.g. to stop routing to it).
    fn on_run_end(&mut self) {}
    /// Called when a reload's new instance did not become ready and was stopped.
    fn abandon_candidate(&mut self) {}
}

/// Requests a running supervisor understands.
#[derive(Debug)]
pub enum Command {
    /// Stop the child and end supervision (reply when stopped).
    Stop(tokio::sync::oneshot::Sender<()>),
    /// Restart now, also out of `Failed`.
    Restart,
    /// Start a new instance, switch to it once ready, then stop the old one
    /// (SIGHUP, `make dev`). Out of `Failed`, the same as `Restart`.
    Reload,
}

/// Handle to a running supervisor task.
pub struct Handle {
    pub name: &'static str,
    tx: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

impl Handle {
    /// Stops the child (with its policy's signals) and waits until it is gone.
    pub async fn stop(self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Command::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }

    pub async fn restart(&self) {
        let _ = self.tx.send(Command::Restart).await;
    }

    /// A sender for commands, for tasks that outlive a borrow of the handle.
    pub fn commands(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }

    pub async fn reload(&self) {
        let _ = self.tx.send(Command::Reload).await;
    }
}

/// Starts supervising `policy`'s child in a new task.
pub fn spawn<P: Policy>(policy: P, restart: RestartPolicy, board: Board) -> Handle {
    let name = policy.name();
    let (tx, rx) = mpsc::channel(8);
    let task = tokio::spawn(Supervisor { policy, restart, board, commands: rx, retiring: Vec::new() }.run());
    Handle { name, tx, task }
}

struct Supervisor<P> {
    policy: P,
    restart: RestartPolicy,
    board: Board,
    commands: mpsc::Receiver<Command>,
    /// Instances replaced by a reload, still draining; awaited before a stop completes.
    retiring: Vec<JoinHandle<()>>,
}

/// How one run ended.
enum RunEnd {
    Exited(String),
    Unhealthy(String),
    /// Stop requested; carries who to tell once stopped.
    Stop(Option<tokio::sync::oneshot::Sender<()>>),
    Restart,
}

impl<P: Policy> Supervisor<P> {
    async fn run(mut self) {
        let name = self.policy.name();
        let mut quick_crashes = 0u32;
        let mut first = true;
        loop {
            if !first {
                self.board.update(name, |c| c.restarts += 1);
            }
            first = false;
            self.board.transition(name, State::Starting, None);
            let started = Instant::now();
            let end = match self.policy.start().await {
                Ok(child) => self.supervise_run(child).await,
                Err(e) => RunEnd::Exited(format!("could not start: {e:#}")),
            };
            let ran_for = started.elapsed();
            self.policy.on_run_end();
            if matches!(end, RunEnd::Stop(_)) {
                for task in self.retiring.drain(..) {
                    let _ = task.await;
                }
            }
            match end {
                RunEnd::Stop(reply) => {
                    self.board.transition(name, State::Stopped, None);
                    if let Some(r) = reply {
                        let _ = r.send(());
                    }
                    return;
                }
                RunEnd::Restart => {
                    quick_crashes = 0;
                    continue;
                }
                RunEnd::Exited(why) | RunEnd::Unhealthy(why) => {
                    self.board.update(name, |c| c.last_exit = Some(why.clone()));
                    if ran_for >= self.restart.stable_after {
                        quick_crashes = 0;
                    }
                    quick_crashes += 1;
                    if quick_crashes >= self.restart.crash_loop_limit {
                        let detail = format!("{quick_crashes} crashes in a row, last: {why}; not restarting (fix the cause, then restart the gateway)");
                        self.board.transition(name, State::Failed, Some(detail));
                        match self.wait_command(None).await {
                            Some(Command::Restart | Command::Reload) => {
                                quick_crashes = 0;
                                continue;
                            }
                            Some(Command::Stop(reply)) => {
                                self.board.transition(name, State::Stopped, None);
                                let _ = reply.send(());
                                return;
                            }
                            None => return,
                        }
                    }
                    let delay = backoff(&self.restart, quick_crashes);
                    self.board.transition(name, State::Backoff, Some(format!("{why}; restarting in {} ms", delay.as_millis())));
                    match self.wait_command(Some(delay)).await {
                        Some(Command::Stop(reply)) => {
                            self.board.transition(name, State::Stopped, None);
                            let _ = reply.send(());
                            return;
                        }
                        Some(Command::Restart | Command::Reload) => quick_crashes = 0,
                        None => {}
                    }
                }
            }
        }
    }

    /// Waits for a command, or `timeout` (returns `None` then).
    async fn wait_command(&mut self, timeout: Option<Duration>) -> Option<Command> {
        match timeout {
            Some(t) => tokio::time::timeout(t, self.commands.recv()).await.ok().flatten(),
            None => self.commands.recv().await,
        }
    }

    /// From a started child to the end of its run.
    async fn supervise_run(&mut self, mut child: Child) -> RunEnd {
        let name = self.policy.name();
        let pid = child.id();
        self.board.update(name, |c| c.pid = pid);
        let timing = self.policy.timing();

        // Readiness.
        let deadline = tokio::time::Instant::now() + timing.start_timeout;
        loop {
            tokio::select! {
                status = child.wait() => return self.exited(pid, status),
                cmd = self.commands.recv() => return self.stop_for(cmd.map(|c| match c { Command::Reload => Command::Restart, c => c }), &mut child).await,
                ok = check_once(&mut self.policy, timing.check_timeout) => {
                    if ok.is_ok() {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        self.stop_child(&mut child).await;
                        return RunEnd::Unhealthy(format!("not ready within {} s", timing.start_timeout.as_secs()));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(timing.ready_poll) => {}
                        status = child.wait() => return self.exited(pid, status),
                    }
                }
            }
        }
        if let Err(e) = self.policy.on_ready().await {
            tracing::error!(component = name, "post-start step failed: {e:#}");
            self.stop_child(&mut child).await;
            return RunEnd::Unhealthy(format!("post-start step failed: {e:#}"));
        }
        self.board.transition(name, State::Ready, None);

        // Liveness.
        let mut misses = 0;
        let mut live_pid = pid;
        let mut tick = tokio::time::interval(timing.live_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                status = child.wait() => return self.exited(live_pid, status),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Reload) => {
                        self.reload(&mut child).await;
                        live_pid = child.id();
                        misses = 0;
                    }
                    other => return self.stop_for(other, &mut child).await,
                },
                _ = tick.tick() => {
                    match check_once(&mut self.policy, timing.check_timeout).await {
                        Ok(()) => misses = 0,
                        Err(e) => {
                            misses += 1;
                            tracing::warn!(component = name, "health check failed ({misses}/{}): {e:#}", timing.failures_before_restart);
                            if misses >= timing.failures_before_restart {
                                self.stop_child(&mut child).await;
                                return RunEnd::Unhealthy(format!("failed {misses} health checks in a row: {e:#}"));
                            }
                        }
                    }
                }
            }
        }
    }

    fn exited(&self, pid: Option<u32>, status: std::io::Result<ExitStatus>) -> RunEnd {
        // Whatever the leader left behind in its group goes with it.
        if let Some(pid) = pid {
            child::signal_group(pid, Signal::SIGKILL);
            child::forget(pid);
        }
        self.board.update(self.policy.name(), |c| c.pid = None);
        let why = match status {
            Ok(s) => describe_exit(s),
            Err(e) => format!("lost track of the process: {e}"),
        };
        tracing::warn!(component = self.policy.name(), "exited unexpectedly: {why}");
        RunEnd::Exited(why)
    }

    async fn stop_for(&mut self, cmd: Option<Command>, child: &mut Child) -> RunEnd {
        self.board.transition(self.policy.name(), State::Stopping, None);
        self.stop_child(child).await;
        match cmd {
            Some(Command::Restart | Command::Reload) => RunEnd::Restart,
            Some(Command::Stop(reply)) => RunEnd::Stop(Some(reply)),
            None => RunEnd::Stop(None),
        }
    }

    /// Stops the run with the policy's signals, escalating on timeout.
    async fn stop_child(&mut self, child: &mut Child) {
        terminate(self.policy.name(), child, self.policy.stop_signals()).await;
        self.board.update(self.policy.name(), |c| c.pid = None);
    }

    /// Blue/green replacement of a ready run: the new instance must pass its
    /// readiness check before traffic moves to it and the old one is drained.
    /// If it does not, it is stopped and the old one keeps serving.
    async fn reload(&mut self, child: &mut Child) {
        let name = self.policy.name();
        tracing::info!(component = name, "reload: starting a new instance beside the running one");
        let mut candidate = match self.policy.start().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(component = name, "reload failed, keeping the running instance: {e:#}");
                self.policy.abandon_candidate();
                return;
            }
        };
        let timing = self.policy.timing();
        let deadline = tokio::time::Instant::now() + timing.start_timeout;
        let ready = loop {
            tokio::select! {
                status = candidate.wait() => {
                    tracing::error!(component = name, "reload: the new instance exited ({}); keeping the running one", status.map(describe_exit).unwrap_or_else(|e| e.to_string()));
                    break false;
                }
                ok = check_once(&mut self.policy, timing.check_timeout) => {
                    if ok.is_ok() {
                        break true;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        tracing::error!(component = name, "reload: the new instance was not ready within {} s; keeping the running one", timing.start_timeout.as_secs());
                        break false;
                    }
                    tokio::time::sleep(timing.ready_poll).await;
                }
            }
        };
        let ready = ready && match self.policy.on_ready().await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(component = name, "reload: post-start step failed: {e:#}");
                false
            }
        };
        if !ready {
            terminate(name, &mut candidate, self.policy.stop_signals()).await;
            self.policy.abandon_candidate();
            return;
        }
        let mut old = std::mem::replace(child, candidate);
        self.board.update(name, |c| c.pid = child.id());
        tracing::info!(component = name, "reload: new instance (pid {}) serving; draining the old one", child.id().unwrap_or(0));
        let signals = self.policy.stop_signals();
        self.retiring.retain(|t| !t.is_finished());
        self.retiring.push(tokio::spawn(async move {
            // Requests that picked the old instance an instant before the
            // switch are still on their way to it; let them arrive before it
            // starts refusing new ones.
            tokio::time::sleep(RELOAD_QUIESCE).await;
            terminate(name, &mut old, signals).await;
        }));
    }
}

/// Stops `child` with `signals`, escalating on timeout; whatever is left of
/// its process group is killed at the end.
pub async fn terminate(name: &'static str, child: &mut Child, signals: StopSignals) {
    let Some(pid) = child.id() else { return };
    let nix_pid = nix::unistd::Pid::from_raw(pid as i32);
    let mut steps = vec![(signals.first, signals.grace)];
    if let Some(second) = signals.second {
        steps.push((second, Duration::from_secs(5)));
    }
    for (sig, wait) in steps {
        tracing::info!(component = name, "sending {sig} to pid {pid}");
        let _ = nix::sys::signal::kill(nix_pid, sig);
        if let Ok(status) = tokio::time::timeout(wait, child.wait()).await {
            tracing::info!(component = name, "stopped ({})", status.map(describe_exit).unwrap_or_else(|e| e.to_string()));
            child::signal_group(pid, Signal::SIGKILL);
            child::forget(pid);
            return;
        }
        tracing::warn!(component = name, "still running {} s after {sig}", wait.as_secs());
    }
    tracing::warn!(component = name, "killing process group {pid}");
    child::signal_group(pid, Signal::SIGKILL);
    let _ = child.wait().await;
    child::forget(pid);
}

async fn check_once<P: Policy>(policy: &mut P, timeout: Duration) -> Result<()> {
    match tokio::time::timeout(timeout, policy.check()).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("no answer within {} ms", timeout.as_millis()),
    }
}

/// Delay before restart number `crashes` (1-based): initial × 2^(n-1), capped,
/// with ±20 % jitter so children of many gateways do not restart in lockstep.
pub fn backoff(p: &RestartPolicy, crashes: u32) -> Duration {
    let exp = p.backoff_initial.saturating_mul(1u32.checked_shl(crashes.saturating_sub(1)).unwrap_or(u32::MAX));
    let base = exp.min(p.backoff_max);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    base.mul_f64(jitter)
}

/// "exit status 1", "killed by SIGKILL".
pub fn describe_exit(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = s.code() {
        return format!("exit status {code}");
    }
    match s.signal().and_then(|n| Signal::try_from(n).ok()) {
        Some(sig) => format!("killed by {sig}"),
        None => format!("{s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            crash_loop_limit: 6,
            stable_after: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(20),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let p = policy();
        for (n, base_ms) in [(1, 100.0), (2, 200.0), (3, 400.0), (10, 30_000.0), (40, 30_000.0)] {
            let d = backoff(&p, n).as_secs_f64() * 1000.0;
            assert!(d >= base_ms * 0.8 && d <= base_ms * 1.2, "crash {n}: {d} ms");
        }
    }

    #[test]
    fn exits_are_described_in_words() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_exit(ExitStatus::from_raw(256)), "exit status 1");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
