//! One supervision mechanism for every child.
//!
//! PostgreSQL and the API worker are supervised by the same loop; they differ
//! only by a [`Policy`] value: how to start one run, how to check it, how to
//! stop it. The loop is an explicit state machine over [`State`]:
//!
//! ```text
//!              ┌──────── delay over, SIGHUP, or the dependency is ready again ────────┐
//!              ▼                                                                       │
//!   Stopped ─▶ Starting ──ready check passes──▶ Ready ──exit / failed liveness──▶ Backoff
//!              │  │                             │  ▲                                   ▲
//!              │  └── exit / start timeout / could not start ─────────────────────────┘
//!              │                                └──┘ SIGHUP: reload (flag `reloading`): the new
//!              │                                     instance serves once ready, else the old stays
//!              └── start error no retry can fix ([`Permanent`]) ──▶ Failed ──SIGHUP──▶ Starting
//!   (any state) ──stop requested──▶ Stopping ──▶ Stopped
//! ```
//!
//! Readiness (first passing check of a run) gates traffic; liveness (checks
//! while ready) drives restarts, after `failures_before_restart` misses in a
//! row so one slow query does not bounce the database.
//!
//! **Never give up.** A child that keeps failing is retried forever. The
//! delay before attempt n is initial × 2^(n−1), capped at `backoff_max`, less
//! up to 20 % jitter (so the cap is a true cap and gateways do not restart in
//! lockstep); the count starts over once a run has been ready for
//! `stable_after`. `crash_loop_limit` quick failures in a row set the
//! `crash_looping` flag (an error in the log, a gauge in `/metrics`), and the
//! retries go on. Only a start error the policy marks [`Permanent`] ends in
//! `Failed`, where SIGHUP retries at once. These decisions are the pure
//! functions [`decide`], [`may_give_up`] and [`backoff`].
//!
//! A child whose failures may come from its dependency (the worker, from
//! PostgreSQL) does not wait out its delay once that dependency is ready
//! again, so the whole stack is back within one capped delay of the last crash.
//!
//! **Always listening.** Every wait — the policy's `start` and `on_ready`
//! steps, backoff, readiness, a reload's new instance — also listens for
//! commands, so a stop is acted on at once (a step under way gets
//! `STOP_GRACE` (2 s) to finish, then is abandoned; a child it started is
//! stopped). A start gate ([`Policy::gate`]) is waited on before `start`,
//! outside its timeout. A start has a timeout: `start`
//! itself and the readiness that follows each get the policy's
//! `start_timeout`. A reload asked while a child starts is queued, as
//! systemd queues jobs, and done once the start ends: it never turns into a
//! restart of the starting child. And every turn of the loop renews a
//! heartbeat on the board, which the systemd watchdog checks before it pings.
//!
//! Layer: the mechanism, above `status`, `process` and `config`. It knows
//! nothing of PostgreSQL, the worker or the WAL: those are [`Policy`] values
//! made in the layers above. `shutdown.rs` is the gateway's one way to stop
//! (stages, tokens, trackers; a supervisor ends when its stage's token is
//! cancelled); `gate.rs` is the start gate a restore holds; `sd_notify.rs`
//! talks to systemd.

pub mod gate;
pub mod sd_notify;
pub mod shutdown;

use std::fmt;
use std::future::Future;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;
use rand::Rng;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::process::child;
use crate::config::RestartPolicy;
use crate::status::{Board, State};

/// After a reload switches traffic, how long the old instance keeps
/// accepting before it is told to drain.
const RELOAD_QUIESCE: Duration = Duration::from_millis(300);
/// While nothing else happens (backoff, failed), how often the loop still
/// goes round to renew its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Added to every heartbeat promise: a late wake-up on a loaded machine is
/// not a hang.
const HEARTBEAT_SLACK: Duration = Duration::from_secs(5);
/// The longest a policy's `start` or `on_ready` may take before the
/// watchdog counts the loop as stuck (preflight checks, flushing a new
/// cluster to disk, creating the app database).
const STEP_BUDGET: Duration = Duration::from_secs(120);
/// A step under way when a stop comes is given this long to finish (a
/// connection halfway through its authentication is better completed and
/// closed than cut), then abandoned.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How to stop a child: a polite signal, then a firmer one, then SIGKILL to
/// its whole process group.
#[derive(Debug, Clone, Copy)]
pub struct StopSignals {
    pub first: Signal,
    /// Sent if the child is still running `grace` after `first`.
    pub second: Option<Signal>,
    pub grace: Duration,
}

/// After `second`, how long before the process group is killed.
const SECOND_SIGNAL_GRACE: Duration = Duration::from_secs(5);

impl StopSignals {
    /// The longest [`terminate`] can take with these signals.
    fn budget(&self) -> Duration {
        self.grace + self.second.map_or(Duration::ZERO, |_| SECOND_SIGNAL_GRACE) + Duration::from_secs(1)
    }
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
    /// Starts one run (preflight checks included). An error that no retry
    /// can fix is wrapped with [`permanent`]; every other error is retried
    /// with backoff.
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
    /// A gate this child's starts wait on (a restore holds it). The wait is
    /// done before `start`, listening for commands, and does not count
    /// against the start timeout.
    fn gate(&self) -> Option<gate::StartGate> {
        None
    }
    /// A child whose stage stops late (after the component it depends on)
    /// but whose start should not race that stop: once the gateway's stop
    /// is asked, a start under way (or a wait before one) is abandoned at
    /// once, while a ready run lasts until its stage stops.
    fn abandons_starts_once_stop_asked(&self) -> bool {
        false
    }
}

/// A start error no retry can fix: a missing or unusable binary, a cluster
/// of another major version, settings the child rejects before it runs.
/// The supervisor stops retrying and shows `failed` with the message until
/// SIGHUP. Anything not marked so is retried forever.
#[derive(Debug)]
pub struct Permanent(anyhow::Error);

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Permanent {}

/// Marks `error` as one no retry can fix (see [`Permanent`]). Context added
/// on top afterwards keeps the mark.
pub fn permanent(error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Permanent(error.into()))
}

/// Whether a start error was marked with [`permanent`] anywhere in its chain.
pub fn is_permanent(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<Permanent>())
}

/// Requests a running supervisor understands. Stopping is not one of
/// them: a supervisor stops when its shutdown stage's token is cancelled
/// ([`shutdown`]), like every other task of the gateway.
#[derive(Debug)]
pub enum Command {
    /// Start again now with a fresh failure count: out of `Backoff` or
    /// `Failed` at once; a running child is stopped first.
    Restart,
    /// Start a new instance, switch to it once ready, then stop the old one
    /// (SIGHUP, `make dev`). Out of `Backoff` or `Failed`, the same as `Restart`;
    /// while a child starts, queued until the start ends.
    Reload,
    /// Start again now with a fresh failure count if the child is down
    /// (`Backoff` or `Failed`); ignored otherwise, so a caller need not read
    /// the board first and race it (SIGHUP).
    Retry,
}

/// Handle to a running supervisor task.
pub struct Handle {
    pub name: &'static str,
    tx: mpsc::Sender<Command>,
}

impl Handle {
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

    /// Retries the child at once if it is down; nothing otherwise.
    pub async fn retry(&self) {
        let _ = self.tx.send(Command::Retry).await;
    }
}

/// Starts supervising `policy`'s child in a task of `stage`, which stops
/// the child and ends when the stage's token is cancelled. With
/// `depends_on`, a failure is not waited out once that component is ready
/// again (see the module docs).
pub fn spawn<P: Policy>(policy: P, restart: RestartPolicy, board: Board, stage: &shutdown::Stage, depends_on: Option<&'static str>) -> Handle {
    let name = policy.name();
    let (tx, rx) = mpsc::channel(8);
    let early_stop = policy.abandons_starts_once_stop_asked().then(|| stage.asked());
    let supervisor = Supervisor {
        policy,
        restart,
        board,
        depends_on,
        commands: Inbox { commands: rx, stop: stage.token(), asked: early_stop, ready: false, closed: false },
        retiring: TaskTracker::new(),
        hurry_retiring: CancellationToken::new(),
        hurry: stage.hurried(),
        asked: stage.asked(),
        failures: 0,
        reload_queued: false,
    };
    stage.spawn(supervisor.run());
    Handle { name, tx }
}

/// What a supervisor hears: commands, and its stage's stop.
struct Inbox {
    commands: mpsc::Receiver<Command>,
    stop: CancellationToken,
    /// With [`Policy::abandons_starts_once_stop_asked`]: the gateway's stop
    /// asked, which is the stop too while no run is `ready`.
    asked: Option<CancellationToken>,
    /// A run is ready (set by the supervisor).
    ready: bool,
    /// Every sender is gone: no command will come, only the stop.
    closed: bool,
}

impl Inbox {
    /// The next command; `None` once the stop is asked, which every wait of
    /// the loop takes as the stop. Only the stop ends supervision: a
    /// dropped [`Handle`] does not.
    async fn recv(&mut self) -> Option<Command> {
        let early = self.asked.clone().filter(|_| !self.ready);
        loop {
            if self.stop.is_cancelled() || early.as_ref().is_some_and(CancellationToken::is_cancelled) {
                return None;
            }
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return None,
                () = async { early.as_ref().expect("guarded").cancelled().await }, if early.is_some() => return None,
                cmd = self.commands.recv(), if !self.closed => match cmd {
                    Some(cmd) => return Some(cmd),
                    None => self.closed = true,
                },
            }
        }
    }
}

struct Supervisor<P> {
    policy: P,
    restart: RestartPolicy,
    board: Board,
    /// A component whose outage can make this one fail (the worker needs PostgreSQL).
    depends_on: Option<&'static str>,
    commands: Inbox,
    /// Instances replaced by a reload, still draining; awaited before a stop completes.
    retiring: TaskTracker,
    /// Cancelled at stop: retiring instances skip their quiet period.
    hurry_retiring: CancellationToken,
    /// Cancelled when the gateway's stop is hurried (a second stop signal).
    hurry: CancellationToken,
    /// Cancelled once the gateway's stop is asked: a run that ends from then
    /// on (the streamer when PostgreSQL, stopped before it, is gone) is not
    /// restarted; its stage's stop is awaited.
    asked: CancellationToken,
    /// Failed runs in a row without a stable one: the backoff exponent.
    failures: u32,
    /// A reload asked while the child was starting, done once it is ready.
    reload_queued: bool,
}

/// How one run ended.
enum RunEnd {
    /// Ended without being asked: exited, failed its checks, or could not start.
    Failed { why: String, outcome: Outcome },
    /// Stop requested.
    Stop,
    Restart,
}

/// Why a wait (backoff, failed) ended.
enum Wake {
    /// Start again, keeping the failure count (the delay is over, or the dependency is back).
    Retry,
    /// Start again with a fresh count (SIGHUP, restart).
    Fresh,
    Stop,
}

/// A reload's new instance, until it is ready or given up.
struct Candidate {
    child: Child,
    pid: Option<u32>,
    deadline: tokio::time::Instant,
}

impl<P: Policy> Supervisor<P> {
    async fn run(mut self) {
        let name = self.policy.name();
        let mut first = true;
        loop {
            if !first {
                self.board.update(name, |c| c.restarts += 1);
            }
            first = false;
            let attempt = (self.failures > 0).then(|| format!("attempt {}", self.failures + 1));
            self.board.transition(name, State::Starting, attempt);
            let run_started = Instant::now();
            if let Some(gate) = self.policy.gate() {
                if let Step::Interrupted(end, _) = bounded(name, &self.board, gate.wait(name), None, &mut self.commands, &mut self.reload_queued).await {
                    tracing::info!(component = name, "asked to {} while its start waited: the start is abandoned", end.verb());
                    self.policy.on_run_end();
                    match end {
                        RunEnd::Stop => return self.finish().await,
                        _ => {
                            self.reset_failures();
                            continue;
                        }
                    }
                }
            }
            let budget = self.policy.timing().start_timeout;
            let end = match bounded(name, &self.board, self.policy.start(), Some(budget), &mut self.commands, &mut self.reload_queued).await {
                Step::Done(Ok(child)) => self.supervise_run(child).await,
                Step::Done(Err(e)) => {
                    let outcome = if is_permanent(&e) { Outcome::Permanent } else { Outcome::Failed { ready_for: None } };
                    RunEnd::Failed { why: format!("could not start: {e:#}"), outcome }
                }
                Step::TimedOut => {
                    let why = format!("could not start: the start did not finish within {}", human(budget));
                    RunEnd::Failed { why, outcome: Outcome::Failed { ready_for: None } }
                }
                Step::Interrupted(end, finished) => {
                    match finished {
                        Some(Ok(mut child)) => {
                            tracing::info!(component = name, "asked to {} while starting: stopping the child just started", end.verb());
                            self.stop_child(&mut child).await;
                        }
                        _ => tracing::info!(component = name, "asked to {} while starting: the start is abandoned", end.verb()),
                    }
                    end
                }
            };
            self.policy.on_run_end();
            // A reload queued by a start that did not end ready is moot: the
            // next start is a new instance anyway.
            self.reload_queued = false;
            let wake = match end {
                RunEnd::Stop => return self.finish().await,
                RunEnd::Restart => Wake::Fresh,
                RunEnd::Failed { why, .. } if self.asked.is_cancelled() => {
                    self.board.transition(name, State::Stopped, Some(format!("ended while the gateway stops: {why}")));
                    self.wait_for_stop().await;
                    return self.finish().await;
                }
                RunEnd::Failed { why, outcome } => {
                    self.board.update(name, |c| c.last_exit = Some(why.clone()));
                    let jitter: f64 = rand::thread_rng().gen();
                    match decide(&self.restart, self.failures, outcome, jitter) {
                        Decision::GiveUp => {
                            let detail = format!("{why}. No retry can fix this: fix the cause, then send SIGHUP to the gateway (or restart it)");
                            self.board.transition(name, State::Failed, Some(detail));
                            self.wait_in_failed().await
                        }
                        Decision::Retry { attempt, delay, crash_looping } => {
                            self.enter_backoff(attempt, delay, crash_looping, &why);
                            self.wait_in_backoff(delay, run_started).await
                        }
                    }
                }
            };
            match wake {
                Wake::Stop => return self.finish().await,
                Wake::Retry => {}
                Wake::Fresh => self.reset_failures(),
            }
        }
    }

    /// Renews this loop's heartbeat: it will go round again within `within`.
    fn beat(&self, within: Duration) {
        self.board.beat(self.policy.name(), within + HEARTBEAT_SLACK);
    }

    fn enter_backoff(&mut self, attempt: u32, delay: Duration, crash_looping: bool, why: &str) {
        let name = self.policy.name();
        self.failures = attempt;
        let was_looping = self.board.snapshot().get(name).is_some_and(|c| c.crash_looping);
        if crash_looping && !was_looping {
            tracing::error!(
                component = name,
                "crash loop: {attempt} failures in a row without a stable run (OMNI_CRASH_LOOP_LIMIT={}), last: {why}. \
                 Still retrying, at least every {}; the child's own lines above say why it fails",
                self.restart.crash_loop_limit,
                human(self.restart.backoff_max),
            );
        }
        self.board.update(name, |c| {
            c.attempts = attempt;
            c.crash_looping = crash_looping;
            c.next_retry = Some(Instant::now() + delay);
        });
        self.board.transition(name, State::Backoff, Some(format!("attempt {attempt}, next in {}, last: {why}", human(delay))));
    }

    /// A stable run, SIGHUP or a restart: the next failure is a first one again.
    fn reset_failures(&mut self) {
        let name = self.policy.name();
        if self.board.snapshot().get(name).is_some_and(|c| c.crash_looping) {
            tracing::info!(component = name, "no longer crash-looping");
        }
        self.failures = 0;
        self.board.update(name, |c| {
            c.attempts = 0;
            c.crash_looping = false;
        });
    }

    /// Waits out a restart delay; cut short by a command, or by the
    /// dependency becoming ready again after this run had started.
    async fn wait_in_backoff(&mut self, delay: Duration, run_started: Instant) -> Wake {
        let until = tokio::time::Instant::now() + delay;
        let mut board_rx = self.board.subscribe();
        loop {
            if let Some(dep) = self.dependency_back_since(run_started) {
                tracing::info!(component = self.policy.name(), "{dep} is ready again: starting now instead of waiting out the delay");
                return Wake::Retry;
            }
            self.beat(HEARTBEAT_EVERY);
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Wake::Retry,
                _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
                _ = board_rx.changed(), if self.depends_on.is_some() => {}
                cmd = self.commands.recv() => match cmd {
                    None => return Wake::Stop,
                    Some(Command::Restart | Command::Reload | Command::Retry) => return Wake::Fresh,
                },
            }
        }
    }

    /// Ended while the gateway stops: only the stage's stop is awaited
    /// (commands asking for a restart are moot now).
    async fn wait_for_stop(&mut self) {
        loop {
            self.beat(HEARTBEAT_EVERY);
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
                cmd = self.commands.recv() => if cmd.is_none() {
                    return;
                },
            }
        }
    }

    /// `Failed`: nothing happens until someone asks.
    async fn wait_in_failed(&mut self) -> Wake {
        loop {
            self.beat(HEARTBEAT_EVERY);
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
                cmd = self.commands.recv() => match cmd {
                    None => return Wake::Stop,
                    Some(Command::Restart | Command::Reload | Command::Retry) => return Wake::Fresh,
                },
            }
        }
    }

    /// The dependency's name if it is ready and became so after `since`.
    fn dependency_back_since(&self, since: Instant) -> Option<&'static str> {
        let dep = self.depends_on?;
        let snapshot = self.board.snapshot();
        let c = snapshot.get(dep)?;
        (c.state == State::Ready && c.ready_since.is_some_and(|t| t > since)).then_some(dep)
    }

    /// Supervision is over: retiring instances are stopped, the board says so.
    async fn finish(self) {
        let name = self.policy.name();
        self.board.unwatch(name);
        self.hurry_retiring.cancel();
        self.retiring.close();
        self.retiring.wait().await;
        self.board.transition(name, State::Stopped, None);
    }

    /// From a started child to the end of its run.
    async fn supervise_run(&mut self, mut child: Child) -> RunEnd {
        let name = self.policy.name();
        let pid = child.id();
        self.board.update(name, |c| c.pid = pid);
        if let Err(end) = self.await_ready(&mut child, pid).await {
            return end;
        }
        self.commands.ready = true;
        let end = self.serve_until_end(child, pid).await;
        self.commands.ready = false;
        end
    }

    /// Readiness: the first passing check of a run, then the policy's
    /// post-start step. `Err` when the run ended before it was ready.
    async fn await_ready(&mut self, child: &mut Child, pid: Option<u32>) -> Result<(), RunEnd> {
        let name = self.policy.name();
        let timing = self.policy.timing();
        let deadline = tokio::time::Instant::now() + timing.start_timeout;
        let mut next_check = tokio::time::Instant::now();
        loop {
            self.beat(timing.ready_poll + timing.check_timeout);
            tokio::select! {
                status = child.wait() => return Err(self.exited(pid, status, None)),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Reload) => queue_reload(name, &mut self.reload_queued),
                    Some(Command::Retry) => {}
                    other => return Err(self.stop_run(end_for(other), child, None).await),
                },
                ok = check_at(next_check, &mut self.policy, timing.check_timeout) => {
                    if ok.is_ok() {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        self.stop_child(child).await;
                        let why = format!("not ready within {} s", timing.start_timeout.as_secs());
                        return Err(RunEnd::Failed { why, outcome: Outcome::Failed { ready_for: None } });
                    }
                    next_check = tokio::time::Instant::now() + timing.ready_poll;
                }
            }
        }
        match bounded(name, &self.board, self.policy.on_ready(), Some(STEP_BUDGET), &mut self.commands, &mut self.reload_queued).await {
            Step::Done(Ok(())) => {}
            Step::Done(Err(e)) => {
                tracing::error!(component = name, "post-start step failed: {e:#}");
                self.stop_child(child).await;
                return Err(RunEnd::Failed { why: format!("post-start step failed: {e:#}"), outcome: Outcome::Failed { ready_for: None } });
            }
            Step::TimedOut => {
                let why = format!("post-start step did not finish within {} s", STEP_BUDGET.as_secs());
                tracing::error!(component = name, "{why}");
                self.stop_child(child).await;
                return Err(RunEnd::Failed { why, outcome: Outcome::Failed { ready_for: None } });
            }
            Step::Interrupted(end, _) => {
                tracing::info!(component = name, "asked to {} during the post-start step", end.verb());
                return Err(self.stop_run(end, child, None).await);
            }
        }
        Ok(())
    }

    /// Liveness, and reloads (a candidate instance starts beside this one),
    /// from the run's readiness to its end.
    async fn serve_until_end(&mut self, mut child: Child, mut pid: Option<u32>) -> RunEnd {
        let name = self.policy.name();
        let timing = self.policy.timing();
        self.board.transition(name, State::Ready, None);
        let ready_at = Instant::now();
        let mut misses = 0;
        let mut stable = self.failures == 0;
        let mut candidate: Option<Candidate> = None;
        let mut next_check = tokio::time::Instant::now() + timing.live_interval;
        if std::mem::take(&mut self.reload_queued) {
            tracing::info!(component = name, "ready: doing the reload asked while it started");
            candidate = match self.start_candidate(&mut child).await {
                Ok(c) => c,
                Err(end) => return end,
            };
            next_check = tokio::time::Instant::now();
        }
        loop {
            self.beat(timing.live_interval.max(timing.ready_poll) + timing.check_timeout);
            if !stable && ready_at.elapsed() >= self.restart.stable_after {
                stable = true;
                self.reset_failures();
            }
            tokio::select! {
                status = child.wait() => {
                    self.drop_candidate(candidate.take()).await;
                    return self.exited(pid, status, Some(ready_at.elapsed()));
                }
                status = candidate_exit(&mut candidate) => {
                    let c = candidate.take().expect("polled only with a candidate");
                    let how = status.map(describe_exit).unwrap_or_else(|e| e.to_string());
                    tracing::error!(component = name, "reload: the new instance exited ({how}); keeping the running one");
                    reap_group(c.pid);
                    self.policy.abandon_candidate();
                    self.board.update(name, |c| c.reloading = false);
                    next_check = tokio::time::Instant::now() + timing.live_interval;
                }
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Reload) if candidate.is_some() => tracing::info!(component = name, "reload already under way"),
                    Some(Command::Reload) => {
                        candidate = match self.start_candidate(&mut child).await {
                            Ok(c) => c,
                            Err(end) => return end,
                        };
                        next_check = tokio::time::Instant::now();
                    }
                    Some(Command::Retry) => {}
                    other => return self.stop_run(end_for(other), &mut child, candidate.take()).await,
                },
                ok = check_at(next_check, &mut self.policy, timing.check_timeout) => match candidate.take() {
                    Some(c) => match ok {
                        Ok(()) => {
                            if let Err(end) = self.promote(c, &mut child).await {
                                return end;
                            }
                            pid = child.id();
                            misses = 0;
                            next_check = tokio::time::Instant::now() + timing.live_interval;
                        }
                        Err(_) if tokio::time::Instant::now() >= c.deadline => {
                            tracing::error!(component = name, "reload: the new instance was not ready within {} s; keeping the running one", timing.start_timeout.as_secs());
                            self.drop_candidate(Some(c)).await;
                            next_check = tokio::time::Instant::now() + timing.live_interval;
                        }
                        Err(_) => {
                            candidate = Some(c);
                            next_check = tokio::time::Instant::now() + timing.ready_poll;
                        }
                    },
                    None => {
                        match ok {
                            Ok(()) => misses = 0,
                            Err(e) => {
                                misses += 1;
                                tracing::warn!(component = name, "health check failed ({misses}/{}): {e:#}", timing.failures_before_restart);
                                if misses >= timing.failures_before_restart {
                                    self.stop_child(&mut child).await;
                                    let why = format!("failed {misses} health checks in a row: {e:#}");
                                    return RunEnd::Failed { why, outcome: Outcome::Failed { ready_for: Some(ready_at.elapsed()) } };
                                }
                            }
                        }
                        next_check = tokio::time::Instant::now() + timing.live_interval;
                    }
                },
            }
        }
    }

    fn exited(&self, pid: Option<u32>, status: std::io::Result<ExitStatus>, ready_for: Option<Duration>) -> RunEnd {
        reap_group(pid);
        self.board.update(self.policy.name(), |c| c.pid = None);
        let why = match status {
            Ok(s) => describe_exit(s),
            Err(e) => format!("lost track of the process: {e}"),
        };
        if self.asked.is_cancelled() {
            tracing::info!(component = self.policy.name(), "exited while the gateway stops ({why}): not restarted");
        } else {
            tracing::warn!(component = self.policy.name(), "exited unexpectedly: {why}");
        }
        RunEnd::Failed { why, outcome: Outcome::Failed { ready_for } }
    }

    /// Stops the run (and a reload's candidate beside it, at the same time)
    /// for a stop or restart command; `end` is what follows.
    async fn stop_run(&mut self, end: RunEnd, child: &mut Child, candidate: Option<Candidate>) -> RunEnd {
        let name = self.policy.name();
        self.board.transition(name, State::Stopping, None);
        let signals = self.policy.stop_signals();
        self.beat(signals.budget());
        let had_candidate = candidate.is_some();
        let stop_candidate = async {
            if let Some(mut c) = candidate {
                tracing::info!(component = name, "stopping the reload's new instance too");
                terminate(name, &mut c.child, signals, &self.hurry).await;
            }
        };
        tokio::join!(stop_candidate, terminate(name, child, signals, &self.hurry));
        if had_candidate {
            self.policy.abandon_candidate();
        }
        self.board.update(name, |c| c.pid = None);
        end
    }

    /// Stops the run with the policy's signals, escalating on timeout.
    async fn stop_child(&mut self, child: &mut Child) {
        let signals = self.policy.stop_signals();
        self.beat(signals.budget());
        terminate(self.policy.name(), child, signals, &self.hurry).await;
        self.board.update(self.policy.name(), |c| c.pid = None);
    }

    /// Starts a reload's new instance beside the running one (`child`),
    /// listening for commands as every start does: a stop or restart asked
    /// meanwhile ends the run (`Err`, both instances stopped), a reload is
    /// already under way.
    async fn start_candidate(&mut self, child: &mut Child) -> Result<Option<Candidate>, RunEnd> {
        let name = self.policy.name();
        tracing::info!(component = name, "reload: starting a new instance beside the running one");
        let budget = self.policy.timing().start_timeout;
        let started = bounded(name, &self.board, self.policy.start(), Some(budget), &mut self.commands, &mut self.reload_queued).await;
        self.reload_queued = false;
        let candidate = |new: Child| Candidate { pid: new.id(), child: new, deadline: tokio::time::Instant::now() + budget };
        match started {
            Step::Done(Ok(new)) => {
                self.board.update(name, |c| c.reloading = true);
                Ok(Some(candidate(new)))
            }
            Step::Done(Err(e)) => {
                tracing::error!(component = name, "reload failed, keeping the running instance: {e:#}");
                self.policy.abandon_candidate();
                Ok(None)
            }
            Step::TimedOut => {
                tracing::error!(component = name, "reload failed, keeping the running instance: the new instance's start did not finish within {}", human(budget));
                self.policy.abandon_candidate();
                Ok(None)
            }
            Step::Interrupted(end, finished) => {
                tracing::info!(component = name, "asked to {} while a reload's new instance started", end.verb());
                match finished {
                    Some(Ok(new)) => Err(self.stop_run(end, child, Some(candidate(new))).await),
                    _ => {
                        self.policy.abandon_candidate();
                        Err(self.stop_run(end, child, None).await)
                    }
                }
            }
        }
    }

    /// Stops a reload's candidate that will not serve; the old instance stays.
    async fn drop_candidate(&mut self, candidate: Option<Candidate>) {
        let Some(mut c) = candidate else { return };
        let signals = self.policy.stop_signals();
        self.beat(signals.budget());
        terminate(self.policy.name(), &mut c.child, signals, &self.hurry).await;
        self.policy.abandon_candidate();
        self.board.update(self.policy.name(), |c| c.reloading = false);
    }

    /// Blue/green switch: the candidate passed its readiness check; traffic
    /// moves to it and the old instance drains in the background. The
    /// post-start step listens for commands: a stop or restart asked
    /// meanwhile ends the run (`Err`, both instances stopped).
    async fn promote(&mut self, candidate: Candidate, child: &mut Child) -> Result<(), RunEnd> {
        let name = self.policy.name();
        match bounded(name, &self.board, self.policy.on_ready(), Some(STEP_BUDGET), &mut self.commands, &mut self.reload_queued).await {
            Step::Done(Ok(())) => {}
            Step::Done(Err(e)) => {
                tracing::error!(component = name, "reload: post-start step failed: {e:#}");
                self.drop_candidate(Some(candidate)).await;
                return Ok(());
            }
            Step::TimedOut => {
                tracing::error!(component = name, "reload: post-start step did not finish within {} s", STEP_BUDGET.as_secs());
                self.drop_candidate(Some(candidate)).await;
                return Ok(());
            }
            Step::Interrupted(end, _) => {
                tracing::info!(component = name, "asked to {} during a reload's post-start step", end.verb());
                return Err(self.stop_run(end, child, Some(candidate)).await);
            }
        }
        self.reload_queued = false;
        let mut old = std::mem::replace(child, candidate.child);
        self.board.update(name, |c| {
            c.pid = candidate.pid;
            c.reloading = false;
        });
        tracing::info!(component = name, "reload: new instance (pid {}) serving; draining the old one", candidate.pid.unwrap_or(0));
        let signals = self.policy.stop_signals();
        let (hurry, hurried) = (self.hurry_retiring.clone(), self.hurry.clone());
        self.retiring.spawn(async move {
            // Requests that picked the old instance an instant before the
            // switch are still on their way to it; let them arrive before it
            // starts refusing new ones (unless the gateway is stopping).
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_QUIESCE) => {}
                _ = hurry.cancelled() => {}
            }
            terminate(name, &mut old, signals, &hurried).await;
        });
        Ok(())
    }
}

/// How a step the loop awaits (a policy's `start` or `on_ready`) ended.
enum Step<T> {
    Done(T),
    /// It took longer than its budget and was abandoned.
    TimedOut,
    /// A stop or restart came first. The step was given [`STOP_GRACE`]
    /// more to finish (its result, if it did), then abandoned.
    Interrupted(RunEnd, Option<T>),
}

impl RunEnd {
    fn verb(&self) -> &'static str {
        match self {
            RunEnd::Stop => "stop",
            RunEnd::Restart => "restart",
            RunEnd::Failed { .. } => "fail",
        }
    }
}

/// What a stop or restart command (or a closed channel) ends a run with.
fn end_for(cmd: Option<Command>) -> RunEnd {
    match cmd {
        None => RunEnd::Stop,
        Some(Command::Restart | Command::Reload | Command::Retry) => RunEnd::Restart,
    }
}

fn queue_reload(name: &'static str, queued: &mut bool) {
    if !std::mem::replace(queued, true) {
        tracing::info!(component = name, "reload asked while starting: queued until the start ends");
    }
}

/// Awaits `step` for at most `budget` (no limit with `None`) while listening for commands: a stop
/// or restart abandons it (the future is dropped), a reload is queued, a
/// retry means nothing (the child is not down). The heartbeat is renewed
/// meanwhile: a long step that is bounded is not a hang.
async fn bounded<T>(
    name: &'static str,
    board: &Board,
    step: impl Future<Output = T>,
    budget: Option<Duration>,
    commands: &mut Inbox,
    reload_queued: &mut bool,
) -> Step<T> {
    tokio::pin!(step);
    let deadline = budget.map(|b| tokio::time::Instant::now() + b);
    loop {
        board.beat(name, HEARTBEAT_EVERY + HEARTBEAT_SLACK);
        tokio::select! {
            out = &mut step => return Step::Done(out),
            () = sleep_until(deadline) => return Step::TimedOut,
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            cmd = commands.recv() => match cmd {
                Some(Command::Reload) => queue_reload(name, reload_queued),
                Some(Command::Retry) => {}
                other => {
                    let finished = tokio::time::timeout(STOP_GRACE, &mut step).await.ok();
                    return Step::Interrupted(end_for(other), finished);
                }
            },
        }
    }
}

/// Sleeps until `deadline`; never completes without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The exit of a reload's candidate; never completes without one.
async fn candidate_exit(candidate: &mut Option<Candidate>) -> std::io::Result<ExitStatus> {
    match candidate {
        Some(c) => c.child.wait().await,
        None => std::future::pending().await,
    }
}

/// Whatever a leader that exited left behind in its group goes with it.
fn reap_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        child::signal_group(pid, Signal::SIGKILL);
        child::forget(pid);
    }
}

/// Stops `child` with `signals`, escalating on timeout; whatever is left of
/// its process group is killed at the end.
/// A hurried stop (`hurry` cancelled: a second stop signal) does not wait
/// out the first signal's grace: it goes on to the second signal (or
/// SIGKILL) at once.
async fn terminate(name: &'static str, child: &mut Child, signals: StopSignals, hurry: &CancellationToken) {
    let Some(pid) = child.id() else { return };
    let nix_pid = nix::unistd::Pid::from_raw(pid as i32);
    let mut steps = vec![(signals.first, signals.grace, true)];
    if let Some(second) = signals.second {
        steps.push((second, SECOND_SIGNAL_GRACE, false));
    }
    for (sig, wait, may_hurry) in steps {
        tracing::info!(component = name, "sending {sig} to pid {pid}");
        let _ = nix::sys::signal::kill(nix_pid, sig);
        let hurried = async {
            match may_hurry {
                true => hurry.cancelled().await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            waited = tokio::time::timeout(wait, child.wait()) => match waited {
                Ok(status) => {
                    tracing::info!(component = name, "stopped ({})", status.map(describe_exit).unwrap_or_else(|e| e.to_string()));
                    child::signal_group(pid, Signal::SIGKILL);
                    child::forget(pid);
                    return;
                }
                Err(_) => tracing::warn!(component = name, "still running {} s after {sig}", wait.as_secs()),
            },
            () = hurried => tracing::warn!(component = name, "the stop is hurried: not waiting for the end of {sig}"),
        }
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

/// One check at `at`: sleeping inside the future keeps the caller's
/// `select!` listening to commands while it waits.
async fn check_at<P: Policy>(at: tokio::time::Instant, policy: &mut P, timeout: Duration) -> Result<()> {
    tokio::time::sleep_until(at).await;
    check_once(policy, timeout).await
}

/// How a run that nobody asked to end ended, as far as restarting goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It exited, failed its checks or could not start, after being ready
    /// for `ready_for` (`None`: it never was).
    Failed { ready_for: Option<Duration> },
    /// `start` said no retry can fix it ([`Permanent`]).
    Permanent,
}

/// What the supervisor does after a run ended by itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Start again after `delay`: this was failure number `attempt` in a row.
    Retry { attempt: u32, delay: Duration, crash_looping: bool },
    /// Show `failed` and wait for SIGHUP.
    GiveUp,
}

/// May the supervisor stop retrying? Only when no retry can fix the cause;
/// how often or how fast a child has failed never counts.
pub fn may_give_up(outcome: Outcome) -> bool {
    matches!(outcome, Outcome::Permanent)
}

/// The restart decision after a run ended by itself, given the failures in
/// a row before it and `jitter` drawn uniformly from [0, 1).
pub fn decide(p: &RestartPolicy, failures_before: u32, outcome: Outcome, jitter: f64) -> Decision {
    if may_give_up(outcome) {
        return Decision::GiveUp;
    }
    let ready_for = match outcome {
        Outcome::Failed { ready_for } => ready_for,
        Outcome::Permanent => None,
    };
    let stable = ready_for.is_some_and(|d| d >= p.stable_after);
    let attempt = if stable { 1 } else { failures_before.saturating_add(1) };
    Decision::Retry { attempt, delay: backoff(p, attempt, jitter), crash_looping: attempt >= p.crash_loop_limit }
}

/// Delay before restart number `attempt` (1-based): initial × 2^(n−1),
/// capped at `backoff_max`, less up to 20 % jitter (`jitter` in [0, 1)) so
/// children of many gateways do not restart in lockstep. Never above the cap,
/// never below 80 % of it once the cap is reached.
pub fn backoff(p: &RestartPolicy, attempt: u32, jitter: f64) -> Duration {
    let exp = p.backoff_initial.saturating_mul(1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX));
    let base = exp.min(p.backoff_max);
    base.mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0))
}

/// "0.4 s", "12 s": delays as the log and status show them.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} s", d.as_secs_f64().round() as u64)
    }
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

    fn quick() -> Outcome {
        Outcome::Failed { ready_for: Some(Duration::from_secs(1)) }
    }

    #[test]
    fn backoff_doubles_and_is_capped_with_jitter_only_downwards() {
        let p = policy();
        for (n, base_ms) in [(1, 100.0), (2, 200.0), (3, 400.0), (10, 30_000.0), (40, 30_000.0), (u32::MAX, 30_000.0)] {
            for jitter in [0.0, 0.5, 0.999_999] {
                let d = backoff(&p, n, jitter).as_secs_f64() * 1000.0;
                assert!(d >= base_ms * 0.8 && d <= base_ms, "attempt {n}, jitter {jitter}: {d} ms");
            }
        }
        assert_eq!(backoff(&p, 1, 0.0), Duration::from_millis(100), "no jitter: exactly the initial delay");
        assert_eq!(backoff(&p, 0, 0.0), Duration::from_millis(100), "attempt 0 is treated as the first");
    }

    #[test]
    fn no_number_of_quick_failures_makes_the_supervisor_give_up() {
        let p = policy();
        let mut failures = 0;
        for _ in 0..1000 {
            match decide(&p, failures, quick(), 0.5) {
                Decision::Retry { attempt, delay, .. } => {
                    assert!(delay <= p.backoff_max, "attempt {attempt}: {delay:?} is over the cap");
                    failures = attempt;
                }
                Decision::GiveUp => panic!("gave up after {failures} quick failures"),
            }
        }
        assert_eq!(failures, 1000);
        assert!(!may_give_up(Outcome::Failed { ready_for: None }));
        assert!(!may_give_up(quick()));
        assert_eq!(decide(&p, u32::MAX, quick(), 0.0), Decision::Retry { attempt: u32::MAX, delay: p.backoff_max, crash_looping: true });
    }

    #[test]
    fn only_an_error_no_retry_can_fix_gives_up() {
        assert!(may_give_up(Outcome::Permanent));
        assert_eq!(decide(&policy(), 0, Outcome::Permanent, 0.0), Decision::GiveUp);
    }

    #[test]
    fn crash_looping_is_flagged_from_the_limit_on_and_retries_go_on() {
        let p = policy();
        let flags: Vec<bool> = (0..8)
            .map(|before| match decide(&p, before, quick(), 0.0) {
                Decision::Retry { crash_looping, .. } => crash_looping,
                Decision::GiveUp => panic!("gave up"),
            })
            .collect();
        assert_eq!(flags, [false, false, false, false, false, true, true, true]);
    }

    #[test]
    fn a_stable_run_starts_the_count_over() {
        let p = policy();
        let stable = Outcome::Failed { ready_for: Some(p.stable_after) };
        assert_eq!(decide(&p, 9, stable, 0.0), Decision::Retry { attempt: 1, delay: p.backoff_initial, crash_looping: false });
        // A run that never became ready is never stable, however long it took.
        assert!(matches!(decide(&p, 9, Outcome::Failed { ready_for: None }, 0.0), Decision::Retry { attempt: 10, .. }));
    }

    #[test]
    fn permanent_marks_survive_added_context() {
        use anyhow::Context;
        let marked: Result<()> = Err(permanent(anyhow::anyhow!("no such binary")));
        let e = marked.context("could not start the worker").unwrap_err();
        assert!(is_permanent(&e));
        assert_eq!(format!("{e:#}"), "could not start the worker: no such binary");
        assert!(!is_permanent(&anyhow::anyhow!("port in use")));
    }

    #[test]
    fn delays_read_as_people_write_them() {
        assert_eq!(human(Duration::from_millis(380)), "0.4 s");
        assert_eq!(human(Duration::from_millis(12_400)), "12 s");
    }

    /// A policy whose start waits on a gate (as PostgreSQL's waits on a
    /// restore's), then runs `sleep`: a real child, a real wait.
    struct Gated {
        gate: gate::StartGate,
        start_timeout: Duration,
    }

    impl Policy for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }
        async fn start(&mut self) -> Result<Child> {
            self.gate.wait("the test child").await;
            let mut spec = child::ChildSpec::new("gated", "sleep");
            spec.args = vec!["600".into()];
            Ok(child::spawn(spec).await?)
        }
        async fn check(&mut self) -> Result<()> {
            Ok(())
        }
        fn stop_signals(&self) -> StopSignals {
            StopSignals { first: Signal::SIGTERM, second: None, grace: Duration::from_secs(5) }
        }
        fn timing(&self) -> CheckTiming {
            CheckTiming {
                ready_poll: Duration::from_millis(5),
                start_timeout: self.start_timeout,
                live_interval: Duration::from_secs(1),
                check_timeout: Duration::from_secs(1),
                failures_before_restart: 3,
            }
        }
    }

    async fn wait_for_state(board: &Board, state: State) -> Component {
        let mut rx = board.subscribe();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(c) = rx.borrow_and_update().get("gated").filter(|c| c.state == state) {
                    return c.clone();
                }
                rx.changed().await.expect("the board lives");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("gated never reached {state:?}: {:?}", board.snapshot().get("gated")))
    }

    use crate::status::Component;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_during_a_start_that_waits_is_acted_on_at_once_and_leaves_no_child() {
        let gate = gate::StartGate::new("a test");
        let held = gate.hold().await;
        let board = Board::new(&["gated"]);
        let shutdown = shutdown::Shutdown::new(&[("gated", "the gated child", Duration::from_secs(30))]);
        spawn(Gated { gate: gate.clone(), start_timeout: Duration::from_secs(600) }, policy(), board.clone(), shutdown.stage("gated"), None);
        wait_for_state(&board, State::Starting).await;
        let late = tokio::time::timeout(Duration::from_secs(5), shutdown.stop()).await.expect("the stop waited for a start that could not end");
        assert!(late.is_empty());
        assert_eq!(board.state("gated"), Some(State::Stopped));
        drop(held);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_that_does_not_end_in_time_is_a_failure_retried_with_backoff() {
        let gate = gate::StartGate::new("a test");
        let held = gate.hold().await;
        let board = Board::new(&["gated"]);
        let shutdown = shutdown::Shutdown::new(&[("gated", "the gated child", Duration::from_secs(30))]);
        spawn(Gated { gate: gate.clone(), start_timeout: Duration::from_millis(200) }, policy(), board.clone(), shutdown.stage("gated"), None);
        let c = wait_for_state(&board, State::Backoff).await;
        let why = c.last_exit.unwrap_or_default();
        assert!(why.contains("did not finish within 0.2 s"), "{why}");
        // Once the cause is gone, the retry starts and the child is ready.
        drop(held);
        let c = wait_for_state(&board, State::Ready).await;
        let pid = c.pid.expect("a ready child has a pid") as i32;
        assert!(shutdown.stop().await.is_empty());
        assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(), "the child is gone after the stop");
    }

    #[test]
    fn exits_are_described_in_words() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_exit(ExitStatus::from_raw(256)), "exit status 1");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
