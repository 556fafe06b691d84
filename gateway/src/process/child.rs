//! Starting child processes so they can never outlive the gateway.
//!
//! Every child (PostgreSQL, the API worker, `initdb`) is started here, and
//! only here, because three details must be right for all of them:
//!
//! * **Parent-death signal.** `PR_SET_PDEATHSIG` fires when the *thread* that
//!   forked the child exits, not the process. Tokio's blocking threads come and
//!   go, so children are forked from one dedicated thread that lives as long as
//!   the gateway ([`omni_contract::children`], shared with the worker's backup
//!   tools). The signal is set in the child after the privilege drop
//!   (changing uid clears it) and followed by a parent check, which closes the
//!   race where the gateway died between `fork` and `prctl`. Together this is
//!   what makes `kill -9` of the gateway take PostgreSQL with it.
//! * **Own process group.** Each child leads a new process group, so a stop or
//!   a forced kill reaches its helpers too (PostgreSQL backends, anything the
//!   worker forks), and a Ctrl-C in the terminal reaches only the gateway,
//!   which then stops the children in order.
//! * **Clean environment.** systemd's `NOTIFY_SOCKET`/`WATCHDOG_*` and socket
//!   activation variables are the gateway's alone; a child that saw them could
//!   confuse the service manager.
//!
//! Short commands whose output is data (`pg_dump`, `pg_restore --list`,
//! `postgres --version`) go the same way, through [`output`] (or
//! [`output_blocking`] for the probe at start): the same three guarantees,
//! plus the unprivileged account of their [`ChildSpec::run_as`], and a call
//! that is abandoned (its future dropped at a stop) kills the command's whole
//! process group instead of leaving it running unwatched.
//!
//! Output is read line by line and re-emitted as log events tagged with the
//! child's name, each at the child's own severity and with one timestamp: the
//! gateway's. A child's own prefix is parsed away rather than nested inside
//! ours ([`Output`] says how to read each child: PostgreSQL's `LOG:`/`FATAL:`
//! lines, the worker's JSON lines, a tool's plain text).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::collections::HashSet;
use std::sync::Mutex;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tracing::Level;

/// How many descriptors one child may be handed (a fixed array between fork
/// and exec, where nothing may allocate).
pub const MAX_PASSED_FDS: usize = 4;
/// Passed descriptors are first moved at or above this number, so that moving
/// them to their targets never overwrites one not yet moved.
const FIRST_SPARE_FD: i32 = 64;

/// How a child's output lines become log events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Not logged (stdout and stderr go to /dev/null).
    Discard,
    /// PostgreSQL started with `log_line_prefix='[%p] '`: the severity word
    /// (`LOG:`, `WARNING:`, `FATAL:` …) picks the level, `DETAIL:`/`HINT:`
    /// lines follow the line they belong to, and `routine` is the level of
    /// `LOG:` lines and of unrecognised ones.
    Postgres { routine: Level },
    /// The worker's `LOG_FORMAT=json` lines: level, message and fields are
    /// taken from the JSON; its own timestamp is dropped.
    Json,
    /// A tool's plain text (initdb): `error:`/`warning:` lines keep their
    /// severity, everything else is logged at `routine`.
    Text { routine: Level },
    /// Not logged but returned to the caller, stdout and stderr alike: a
    /// short command's output is data ([`output`]).
    Capture,
}

/// Variables that belong to the gateway's own service manager.
const PRIVATE_ENV: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// What to start and how.
pub struct ChildSpec {
    /// Name used in logs, e.g. `postgres`.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Added to (or overriding) the gateway's environment.
    pub env: Vec<(OsString, OsString)>,
    /// Removed from the inherited environment.
    pub env_remove: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    /// Run as this uid/gid (set when the gateway is root and the child must not be).
    pub run_as: Option<(u32, u32)>,
    /// Sent to the child when the gateway dies, however it dies.
    pub death_signal: Signal,
    /// Descriptors handed to the child under these numbers (the worker's
    /// listening socket and its readiness pipe). At most [`MAX_PASSED_FDS`].
    pub pass_fds: Vec<(OwnedFd, i32)>,
    /// How to read the child's stdout/stderr into the log.
    pub output: Output,
    /// What the child reads on stdin (default: nothing).
    pub stdin: Option<std::fs::File>,
    /// Where the child's stdout goes instead of the log, for a tool whose
    /// output is data to read (`pg_waldump`); stderr is still logged.
    pub stdout: Option<std::fs::File>,
}

impl ChildSpec {
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        ChildSpec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            cwd: None,
            run_as: None,
            death_signal: Signal::SIGKILL,
            pass_fds: Vec::new(),
            output: Output::Text { routine: Level::INFO },
            stdin: None,
            stdout: None,
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// Pids of the children started here and not yet reaped by their owner.
/// The reaper leaves these alone; anything else that becomes our zombie is
/// an orphan to reap. Held locked across fork+insert so the reaper never sees
/// a child of ours before it is registered.
static TRACKED: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

/// Whether `pid` is a child started here and not yet reaped (not an
/// orphan the gateway adopted).
pub fn is_own_child(pid: u32) -> bool {
    TRACKED.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|t| t.contains(&pid))
}

/// Stops tracking `pid` once its owner has reaped it.
pub fn forget(pid: u32) {
    if let Some(set) = TRACKED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        set.remove(&pid);
    }
}

/// Runs a short command to completion (`pg_dump`, `pg_restore --list`) and
/// returns its stdout and stderr. It is started like every other child (own
/// process group, parent-death signal, `run_as`); if the returned future is
/// dropped before the command ends, the command's whole process group is
/// killed. Every child the gateway waits for must be started through here,
/// [`output_blocking`] or [`spawn`]: the orphan reaper collects any zombie it
/// does not know, and a wait that finds its child already reaped fails with
/// "No child processes".
pub async fn output(mut spec: ChildSpec) -> io::Result<std::process::Output> {
    spec.output = Output::Capture;
    let child = spawn(spec).await?;
    let mut running = Abandoned::watch(child.id());
    let out = child.wait_with_output().await;
    running.finished();
    out
}

/// [`output`] for code that is not async (the binaries' probe at start).
/// Forked from the calling thread, which waits for the command and so
/// outlives it: the parent-death signal holds as well. A wait abandoned by
/// a panic kills the command's group.
pub fn output_blocking(mut spec: ChildSpec) -> io::Result<std::process::Output> {
    spec.output = Output::Capture;
    let mut cmd = command(&mut spec);
    let child = spawn_registered(|| cmd.spawn(), |c| Some(c.id()));
    drop(spec.pass_fds);
    let child = child?;
    let mut running = Abandoned::watch(Some(child.id()));
    let out = child.wait_with_output();
    running.finished();
    out
}

/// A short command being waited for: if the wait ends without the command
/// having ended (the future dropped, a panic), its whole process group is
/// killed. Either way its pid stops being tracked.
struct Abandoned {
    pid: Option<u32>,
    done: bool,
}

impl Abandoned {
    fn watch(pid: Option<u32>) -> Self {
        Abandoned { pid, done: false }
    }

    fn finished(&mut self) {
        self.done = true;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let Some(pid) = self.pid else { return };
        if !self.done {
            // Not reaped yet (we were waiting for it), so the pid, and the
            // group it leads, are still this command's.
            signal_group(pid, Signal::SIGKILL);
            tracing::debug!(pid, "a short command was abandoned; killed its process group");
        }
        forget(pid);
    }
}

/// Forks with [`TRACKED`] locked and registers the new pid before unlocking,
/// so the reaper never sees a child of ours before it is registered.
fn spawn_registered<C>(spawn: impl FnOnce() -> io::Result<C>, pid: impl Fn(&C) -> Option<u32>) -> io::Result<C> {
    let mut tracked = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
    let child = spawn()?;
    if let Some(pid) = pid(&child) {
        tracked.get_or_insert_with(HashSet::new).insert(pid);
    }
    Ok(child)
}

/// Starts `spec` from the long-lived spawner thread and returns the running
/// child; its output is already being logged (unless [`Output::Discard`] or
/// [`Output::Capture`]).
pub async fn spawn(spec: ChildSpec) -> io::Result<Child> {
    let name = spec.name.clone();
    let output = spec.output;
    if spec.pass_fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::other(format!("{name}: at most {MAX_PASSED_FDS} descriptors can be passed to a child")));
    }
    let handle = tokio::runtime::Handle::current();
    let (reply, answer) = tokio::sync::oneshot::channel();
    omni_contract::children::on_lasting_thread(move || {
        // Tokio's process driver (of the caller's runtime) must be reachable here.
        let _runtime = handle.enter();
        // Nobody waits for this child any more (a start abandoned for a
        // stop): it must not live on unsupervised.
        if let Err(Ok(child)) = reply.send(spawn_here(spec)) {
            if let Some(pid) = child.id() {
                signal_group(pid, Signal::SIGKILL);
                forget(pid);
            }
            drop(child);
        }
    })?;
    let mut child = answer.await.map_err(|_| io::Error::other("spawner thread dropped the request"))??;
    if matches!(output, Output::Postgres { .. } | Output::Json | Output::Text { .. }) {
        if let Some(out) = child.stdout.take() {
            OUTPUT_READERS.spawn(log_lines(name.clone(), output, out));
        }
        if let Some(err) = child.stderr.take() {
            OUTPUT_READERS.spawn(log_lines(name, output, err));
        }
    }
    Ok(child)
}

/// The tasks re-emitting children's output; each ends when its pipe closes.
static OUTPUT_READERS: std::sync::LazyLock<tokio_util::task::TaskTracker> = std::sync::LazyLock::new(tokio_util::task::TaskTracker::new);

/// Returns once every child's output has been read to its end (children
/// that exited have closed their pipes), so their last lines are logged.
pub async fn output_drained() {
    OUTPUT_READERS.close();
    OUTPUT_READERS.wait().await;
}

/// Runs a short-lived helper (initdb, pg_verifybackup, pg_waldump) to
/// completion, its output logged. Like [`output`], a call abandoned before
/// the helper ends kills its process group.
pub async fn run(spec: ChildSpec) -> io::Result<std::process::ExitStatus> {
    let mut child = spawn(spec).await?;
    let mut running = Abandoned::watch(child.id());
    let status = child.wait().await;
    running.finished();
    status
}

fn spawn_here(mut spec: ChildSpec) -> io::Result<Child> {
    let cmd = command(&mut spec);
    let mut tokio_cmd = tokio::process::Command::from(cmd);
    tokio_cmd.kill_on_drop(false);
    let child = spawn_registered(|| tokio_cmd.spawn(), |c| c.id());
    // The parent's copies of passed descriptors are closed here: the child
    // alone holds them from now on (an EOF on the readiness pipe means the
    // worker closed it or died).
    drop(spec.pass_fds);
    child
}

/// The command `spec` describes, with the guarantees of the module docs
/// armed in its `pre_exec` hook. Takes `spec`'s stdin and stdout files; the
/// caller closes its copies of `pass_fds` once the child is forked.
fn command(spec: &mut ChildSpec) -> std::process::Command {
    let mut cmd = std::process::Command::new(&spec.program);
    cmd.args(&spec.args);
    for k in PRIVATE_ENV {
        cmd.env_remove(k);
    }
    for k in &spec.env_remove {
        cmd.env_remove(k);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    if let Some((uid, gid)) = spec.run_as {
        cmd.gid(gid).uid(uid);
    }
    cmd.process_group(0);
    cmd.stdin(spec.stdin.take().map_or_else(Stdio::null, Stdio::from));
    if spec.output == Output::Discard {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    if let Some(file) = spec.stdout.take() {
        cmd.stdout(Stdio::from(file));
    }
    let parent = std::process::id() as i32;
    let death_signal = spec.death_signal as i32;
    let mut passed = [(-1, -1); MAX_PASSED_FDS];
    for (slot, (fd, target)) in passed.iter_mut().zip(&spec.pass_fds) {
        *slot = (fd.as_raw_fd(), *target);
    }
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (prctl, getppid, dup2, fcntl, _exit); nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            omni_contract::children::arm_parent_death(death_signal, parent)?;
            // Two steps, so a descriptor whose number is another one's
            // target is moved out of the way before it is overwritten. The
            // spare copies are close-on-exec; dup2 clears that flag on the
            // targets.
            let mut spare = [-1; MAX_PASSED_FDS];
            for (i, &(fd, _)) in passed.iter().enumerate().filter(|(_, (fd, _))| *fd >= 0) {
                spare[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, FIRST_SPARE_FD);
                if spare[i] < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, &(_, target)) in passed.iter().enumerate().filter(|(_, (fd, _))| *fd >= 0) {
                if libc::dup2(spare[i], target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

async fn log_lines(name: String, output: Output, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    // The level of the last PostgreSQL message, for its DETAIL/HINT lines.
    let mut last = Level::INFO;
    let mut stopping = false;
    while let Ok(Some(line)) = lines.next_line().await {
        let line = strip_escapes(&line);
        stopping = stopping || (line.contains("received ") && line.ends_with(SHUTDOWN_REQUESTED));
        let parsed = parse_line(output, &line, last, stopping);
        last = parsed.level;
        emit(&name, &parsed);
    }
}

/// One output line as the gateway logs it.
#[derive(Debug, PartialEq)]
struct Parsed {
    level: Level,
    /// PostgreSQL's process id from the line prefix (a backend's, usually).
    pid: Option<u32>,
    message: String,
}

/// PostgreSQL messages caused by the gateway's own stops (and, from older
/// clusters' logs, probes); expected, so never reported as errors.
const EXPECTED: &[&str] = &["the database system is starting up", "the database system is shutting down", "terminating connection due to administrator command"];

/// How the postmaster's line for a stop asked of it ends (`received fast
/// shutdown request`, and smart or immediate).
const SHUTDOWN_REQUESTED: &str = " shutdown request";

/// How PostgreSQL words a connection still authenticating when a stop ends
/// it: it reports any interrupt of authentication as a timeout. Expected once
/// the stop was asked (a `pg_receivewal` or a check dialing just then); before
/// that, a client really did hold its authentication for a minute.
const ENDED_AUTHENTICATING: &str = "canceling authentication due to timeout";

/// `pg_receivewal`'s lines when the server it streams from stops (at every
/// stop of the gateway: the streamer stops after PostgreSQL, `app.rs`):
/// expected; the supervisor says whether the exit was.
const EXPECTED_TEXT: &[&str] = &["replication stream was terminated before stop point", "pg_receivewal: error: disconnected"];

/// `stopping`: the server was asked to stop, earlier in this output.
fn parse_line(output: Output, line: &str, previous: Level, stopping: bool) -> Parsed {
    match output {
        Output::Postgres { routine } => parse_postgres(line, routine, previous, stopping),
        Output::Json => parse_json(line).unwrap_or_else(|| Parsed { level: Level::WARN, pid: None, message: line.to_owned() }),
        Output::Text { routine } => {
            let lower = line.to_ascii_lowercase();
            let level = if EXPECTED_TEXT.iter().any(|m| line.contains(m)) {
                routine
            } else if lower.contains("error:") || lower.contains("fatal:") || lower.contains("panic:") {
                Level::ERROR
            } else if lower.contains("warning:") {
                Level::WARN
            } else {
                routine
            };
            Parsed { level, pid: None, message: line.to_owned() }
        }
        Output::Discard | Output::Capture => Parsed { level: Level::TRACE, pid: None, message: String::new() },
    }
}

/// `[1234] FATAL:  message` → error, pid 1234, `FATAL: message`. The
/// severity word is dropped where the level says the same (LOG, WARNING,
/// ERROR) and kept where it says more (FATAL, PANIC, DETAIL, HINT …).
fn parse_postgres(line: &str, routine: Level, previous: Level, stopping: bool) -> Parsed {
    let (pid, rest) = match line.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((digits, rest)) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => (digits.parse().ok(), rest),
        _ => (None, line),
    };
    let Some((word, text)) = rest.split_once(':').filter(|(w, _)| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())) else {
        // A continuation line (a multi-line statement) or a stray one.
        let level = if rest.starts_with(|c: char| c.is_whitespace()) { previous } else { routine };
        return Parsed { level, pid, message: rest.to_owned() };
    };
    let text = text.trim_start();
    let expected = EXPECTED.iter().any(|m| text.contains(m)) || (stopping && text.contains(ENDED_AUTHENTICATING));
    let (level, keep_word) = match word {
        "LOG" | "INFO" | "NOTICE" => (routine, false),
        "WARNING" => (Level::WARN, false),
        "ERROR" => (Level::ERROR, false),
        // Our own stop ending a connection: routine, and worded as such.
        "FATAL" | "PANIC" if expected => (Level::INFO, false),
        "FATAL" | "PANIC" => (Level::ERROR, true),
        "DETAIL" | "HINT" | "CONTEXT" | "STATEMENT" | "QUERY" | "LOCATION" => (previous, true),
        w if w.starts_with("DEBUG") => (Level::DEBUG, false),
        _ => return Parsed { level: routine, pid, message: rest.to_owned() },
    };
    let message = if keep_word { format!("{word}: {text}") } else { text.to_owned() };
    Parsed { level, pid, message }
}

/// A tracing JSON line (`{"timestamp", "level", "message", "target", …fields}`):
/// the level and message, with the other fields appended as `key=value`.
fn parse_json(line: &str) -> Option<Parsed> {
    let serde_json::Value::Object(map) = serde_json::from_str(line).ok()? else { return None };
    let level = match map.get("level")?.as_str()? {
        "ERROR" => Level::ERROR,
        "WARN" => Level::WARN,
        "INFO" => Level::INFO,
        "DEBUG" => Level::DEBUG,
        _ => Level::TRACE,
    };
    let mut message = map.get("message").map(|m| m.as_str().map(str::to_owned).unwrap_or_else(|| m.to_string())).unwrap_or_default();
    for (key, value) in &map {
        if matches!(key.as_str(), "timestamp" | "level" | "message" | "target" | "span" | "spans" | "threadName" | "threadId") {
            continue;
        }
        match value.as_str() {
            Some(text) if !text.is_empty() && !text.contains(char::is_whitespace) => message.push_str(&format!(" {key}={text}")),
            _ => message.push_str(&format!(" {key}={value}")),
        }
    }
    Some(Parsed { level, pid: None, message: one_line(&message) })
}

/// A message that spans lines (a logged SQL statement) as one log line, so
/// every line of the gateway's log starts with its own timestamp.
fn one_line(text: &str) -> String {
    if !text.contains('\n') {
        return text.to_owned();
    }
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Terminal escape sequences (colours) removed: the log may be a file.
fn strip_escapes(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains('\x1b') {
        return line.into();
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        // CSI: ESC [ parameters… final byte in @..~
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out.into()
}

fn emit(name: &str, p: &Parsed) {
    let (pid, message) = (p.pid, p.message.as_str());
    match p.level {
        Level::ERROR => tracing::error!(child = name, pid, "{message}"),
        Level::WARN => tracing::warn!(child = name, pid, "{message}"),
        Level::INFO => tracing::info!(child = name, pid, "{message}"),
        Level::DEBUG => tracing::debug!(child = name, pid, "{message}"),
        _ => tracing::trace!(child = name, pid, "{message}"),
    }
}

/// Sends `sig` to the whole process group led by `pid`; a group already gone is fine.
pub fn signal_group(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Reaps orphans: as PID 1 in a container, or as a child subreaper otherwise,
/// processes whose parent died are re-parented to the gateway, and their
/// zombies must be collected or they accumulate. Our own children are left to
/// their owners (tokio's process driver), which is why only untracked pids are
/// reaped, found through `/proc` on each SIGCHLD.
#[cfg(target_os = "linux")]
pub fn start_reaper(tasks: &tokio_util::task::TaskTracker, stop: tokio_util::sync::CancellationToken) {
    let me = std::process::id();
    if me != 1 {
        if let Err(errno) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!("could not become a child subreaper: {}", io::Error::from(errno));
        }
    } else {
        tracing::info!("running as PID 1: reaping orphaned processes");
    }
    let Ok(mut sigchld) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) else {
        tracing::warn!("could not watch SIGCHLD; orphaned processes will not be reaped");
        return;
    };
    tasks.spawn(async move {
        while stop.run_until_cancelled(sigchld.recv()).await.flatten().is_some() {
            reap_orphans(me);
        }
    });
}

#[cfg(not(target_os = "linux"))]
pub fn start_reaper(_tasks: &tokio_util::task::TaskTracker, _stop: tokio_util::sync::CancellationToken) {}

#[cfg(target_os = "linux")]
fn reap_orphans(me: u32) {
    let tracked = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if tracked.as_ref().is_some_and(|t| t.contains(&pid)) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the parenthesised command name: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let mut fields = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else { continue };
        if state == "Z" && ppid.parse::<u32>().ok() == Some(me) {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            tracing::debug!("reaped orphaned process {pid}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay's `pg_dump` once failed with "No child processes": the
    /// reaper had collected it. Short commands run beside the reaper, many
    /// at once, are each waited for by their caller.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_commands_are_left_to_their_caller_by_the_orphan_reaper() {
        let (tasks, stop) = (tokio_util::task::TaskTracker::new(), tokio_util::sync::CancellationToken::new());
        start_reaper(&tasks, stop.clone());
        let runs = (0..8).map(|_| {
            tokio::spawn(async {
                for _ in 0..40 {
                    let out = output(ChildSpec::new("true", "true")).await.expect("waited for by its caller");
                    assert!(out.status.success());
                }
            })
        });
        for run in runs.collect::<Vec<_>>() {
            run.await.unwrap();
        }
        for _ in 0..40 {
            assert!(output_blocking(ChildSpec::new("true", "true")).expect("waited for by its caller").status.success());
        }
        stop.cancel();
        assert!(TRACKED.lock().unwrap().as_ref().is_none_or(|t| t.is_empty()), "every pid is forgotten after its wait");
    }

    /// Whether `pid` is a live process (a zombie is not: it runs nothing).
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z'))).is_some_and(|zombie| !zombie)
    }

    /// Live processes whose process group is `pgid`.
    fn group_members(pgid: u32) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
                    // After the command name: state, ppid, pgrp.
                    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
                    let state = fields.next()?;
                    let pgrp: u32 = fields.nth(1)?.parse().ok()?;
                    Some(state != "Z" && pgrp == pgid)
                }) == Some(true)
            })
            .collect()
    }

    /// A short command (here a shell with a grandchild) whose caller gives
    /// up — its future dropped at a stop — leaves nothing running: neither
    /// the command nor anything in its process group. Its stdout is data.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_command_abandoned_mid_run_leaves_no_process_in_its_group() {
        let scratch = std::env::temp_dir().join(format!("omni-child-test-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&scratch).unwrap();
        let pids = scratch.join("pids");
        let spec = ChildSpec::new("sh", "sh").arg("-c").arg(format!("echo $$ > {0}.tmp; sleep 600 & echo $! >> {0}.tmp; mv {0}.tmp {0}; echo data; wait", pids.display()));
        let call = tokio::spawn(output(spec));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (shell, sleeper) = loop {
            if let Some(read) = std::fs::read_to_string(&pids).ok().filter(|t| t.lines().count() == 2) {
                let mut lines = read.lines().map(|l| l.trim().parse::<u32>().unwrap());
                break (lines.next().unwrap(), lines.next().unwrap());
            }
            assert!(std::time::Instant::now() < deadline, "the command never wrote its pids");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert!(running(shell) && running(sleeper));
        assert_eq!(group_members(shell).len(), 2, "the command leads its own process group");
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while (running(shell) || running(sleeper) || !group_members(shell).is_empty()) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_dir_all(&scratch);
        assert!(!running(shell), "the abandoned command {shell} still runs");
        assert!(!running(sleeper), "its child {sleeper} still runs");
        assert!(group_members(shell).is_empty(), "its process group still has members");
        // Finished normally, the command's stdout comes back as data.
        let out = output(ChildSpec::new("sh", "sh").arg("-c").arg("echo data; echo oops >&2")).await.unwrap();
        assert_eq!((out.stdout.as_slice(), out.stderr.as_slice()), (&b"data\n"[..], &b"oops\n"[..]));
    }

    /// The probe at start (blocking) runs the same way: own process group.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_blocking_short_command_leads_its_own_process_group() {
        let out = output_blocking(ChildSpec::new("sh", "sh").arg("-c").arg("echo $$; cut -d' ' -f5 /proc/$$/stat")).unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines().map(str::trim);
        assert_eq!(lines.next(), lines.next(), "pid and process group are the same: {text}");
    }

    const PG: Output = Output::Postgres { routine: Level::INFO };

    fn pg(line: &str, previous: Level) -> Parsed {
        parse_line(PG, line, previous, false)
    }

    #[test]
    fn postgres_severities_become_levels_without_their_prefix() {
        assert_eq!(pg("[42] LOG:  database system is ready to accept connections", Level::INFO), Parsed { level: Level::INFO, pid: Some(42), message: "database system is ready to accept connections".into() });
        assert_eq!(pg("[7] WARNING:  worrying", Level::INFO).level, Level::WARN);
        let fatal = pg("[7] FATAL:  password authentication failed for user \"x\"", Level::INFO);
        assert_eq!((fatal.level, fatal.message.as_str()), (Level::ERROR, "FATAL: password authentication failed for user \"x\""));
        // Continuation lines follow the message they belong to.
        assert_eq!(pg("[7] DETAIL:  Connection matched pg_hba.conf line 1", Level::ERROR).level, Level::ERROR);
        assert_eq!(pg("\tSELECT 1", Level::WARN).level, Level::WARN);
        // Caused by the gateway's own stops: expected.
        let stop = pg("[9] FATAL:  terminating connection due to administrator command", Level::INFO);
        assert_eq!((stop.level, stop.message.as_str()), (Level::INFO, "terminating connection due to administrator command"));
        // A connection still authenticating when the stop came: expected
        // then, and an error before (a client held it for a minute).
        let ended = "[9] FATAL:  canceling authentication due to timeout";
        assert_eq!(pg(ended, Level::INFO).level, Level::ERROR);
        assert_eq!(parse_line(PG, ended, Level::INFO, true).level, Level::INFO);
        // A routine level of debug (postgres --single) quiets LOG lines only.
        let quiet = Output::Postgres { routine: Level::DEBUG };
        assert_eq!(parse_line(quiet, "[1] LOG:  checkpoint starting", Level::INFO, false).level, Level::DEBUG);
        assert_eq!(parse_line(quiet, "[1] ERROR:  syntax error", Level::INFO, false).level, Level::ERROR);
        assert_eq!(parse_line(quiet, "backend> ", Level::INFO, false).level, Level::DEBUG);
    }

    #[test]
    fn worker_json_lines_keep_level_message_and_fields_but_not_their_timestamp() {
        let line = r#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"WARN","message":"slow","elapsed_ms":12,"path":"/api/v1/x","target":"omni_api::x"}"#;
        let p = parse_line(Output::Json, line, Level::INFO, false);
        assert_eq!(p.level, Level::WARN);
        assert_eq!(p.message, "slow elapsed_ms=12 path=/api/v1/x");
        assert!(!p.message.contains("2026"));
        let multi = r#"{"level":"DEBUG","message":"executing CREATE TABLE x (\n    a int\n)"}"#;
        assert_eq!(parse_line(Output::Json, multi, Level::INFO, false).message, "executing CREATE TABLE x ( a int )");
        // Anything else the worker prints (a panic) is not lost, and stands out.
        assert_eq!(parse_line(Output::Json, "thread 'main' panicked at src/main.rs:1", Level::INFO, false).level, Level::WARN);
    }

    #[test]
    fn tool_text_is_routine_except_errors_and_warnings() {
        let initdb = Output::Text { routine: Level::DEBUG };
        assert_eq!(parse_line(initdb, "creating subdirectories ... ok", Level::INFO, false).level, Level::DEBUG);
        assert_eq!(parse_line(initdb, "initdb: error: directory \"x\" exists but is not empty", Level::INFO, false).level, Level::ERROR);
        assert_eq!(parse_line(initdb, "initdb: warning: enabling \"trust\" authentication", Level::INFO, false).level, Level::WARN);
    }

    #[test]
    fn colour_codes_are_removed() {
        assert_eq!(strip_escapes("\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m hello"), "2026  INFO hello");
        assert_eq!(strip_escapes("plain"), "plain");
    }
}
