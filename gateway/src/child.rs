//! Starting child processes so they can never outlive the gateway.
//!
//! Every child (PostgreSQL, the API worker, `initdb`) is started here, and
//! only here, because three details must be right for all of them:
//!
//! * **Parent-death signal.** `PR_SET_PDEATHSIG` fires when the *thread* that
//!   forked the child exits, not the process. Tokio's blocking threads come and
//!   go, so children are forked from one dedicated thread that lives as long as
//!   the gateway. The signal is set in the child after the privilege drop
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
//! Output is read line by line and re-emitted as log events tagged with the
//! child's name.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::collections::HashSet;
use std::sync::{mpsc, Mutex, OnceLock};

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;

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
    /// A socket handed to the child as this fd number (for the worker's listener).
    pub pass_fd: Option<(OwnedFd, i32)>,
    /// Re-emit stdout/stderr lines in the log (false: discard).
    pub log_output: bool,
    /// What the child reads on stdin (default: nothing).
    pub stdin: Option<std::fs::File>,
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
            pass_fd: None,
            log_output: true,
            stdin: None,
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

/// Stops tracking `pid` once its owner has reaped it.
pub fn forget(pid: u32) {
    if let Some(set) = TRACKED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        set.remove(&pid);
    }
}

type Request = (ChildSpec, tokio::sync::oneshot::Sender<io::Result<Child>>);

static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();

/// Starts `spec` from the long-lived spawner thread and returns the running
/// child; its output is already being logged.
pub async fn spawn(spec: ChildSpec) -> io::Result<Child> {
    let name = spec.name.clone();
    let log_output = spec.log_output;
    let tx = SPAWNER.get_or_init(start_spawner_thread);
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    tx.send((spec, reply_tx)).map_err(|_| io::Error::other("spawner thread is gone"))?;
    let mut child = reply_rx.await.map_err(|_| io::Error::other("spawner thread dropped the request"))??;
    if log_output {
        if let Some(out) = child.stdout.take() {
            tokio::spawn(log_lines(name.clone(), out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(log_lines(name, err));
        }
    }
    Ok(child)
}

/// Runs a short-lived helper (initdb and the like) to completion.
pub async fn run(spec: ChildSpec) -> io::Result<std::process::ExitStatus> {
    let mut child = spawn(spec).await?;
    let pid = child.id();
    let status = child.wait().await;
    if let Some(pid) = pid {
        forget(pid);
    }
    status
}

fn start_spawner_thread() -> mpsc::Sender<Request> {
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("child-spawner".into())
        .spawn(move || {
            // Tokio's process driver must be reachable from this thread.
            let _guard = handle.enter();
            for (spec, reply) in rx {
                let _ = reply.send(spawn_here(spec));
            }
        })
        .expect("cannot start the child-spawner thread");
    tx
}

fn spawn_here(mut spec: ChildSpec) -> io::Result<Child> {
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
    if spec.log_output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let parent = std::process::id() as i32;
    let death_signal = spec.death_signal as i32;
    let pass_fd = spec.pass_fd.as_ref().map(|(fd, target)| (fd.as_raw_fd(), *target));
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (prctl, getppid, dup2, fcntl, _exit); nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            set_parent_death_signal(death_signal)?;
            if libc::getppid() != parent {
                // The gateway died before the signal was armed.
                libc::_exit(1);
            }
            if let Some((fd, target)) = pass_fd {
                if fd == target {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut tokio_cmd = tokio::process::Command::from(cmd);
    tokio_cmd.kill_on_drop(false);
    let mut tracked = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
    let child = tokio_cmd.spawn();
    if let Ok(c) = &child {
        if let Some(pid) = c.id() {
            tracked.get_or_insert_with(HashSet::new).insert(pid);
        }
    }
    drop(tracked);
    // The parent's copy of a passed socket is closed here, when `spec` drops.
    drop(spec.pass_fd);
    child
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(sig: i32) -> io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a plain integer.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_sig: i32) -> io::Result<()> {
    // No equivalent outside Linux; the gateway's own shutdown path and the
    // children's parent checks (PostgreSQL notices a dead postmaster parent)
    // are the fallback.
    Ok(())
}

async fn log_lines(name: String, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        emit(&name, &line);
    }
}

/// PostgreSQL messages caused by the gateway's own readiness probes and
/// stops; expected, so not reported as errors.
const EXPECTED: &[&str] = &["the database system is starting up", "the database system is shutting down", "terminating connection due to administrator command"];

/// Re-emits one output line, keeping the child's own severity where it says one.
fn emit(name: &str, line: &str) {
    let upper = line.to_ascii_uppercase();
    if EXPECTED.iter().any(|m| line.contains(m)) {
        tracing::info!(child = name, "{line}");
    } else if ["FATAL:", "PANIC:", " ERROR ", "ERROR:", "\"LEVEL\":\"ERROR\""].iter().any(|m| upper.contains(m)) {
        tracing::error!(child = name, "{line}");
    } else if ["WARNING:", " WARN ", "\"LEVEL\":\"WARN\""].iter().any(|m| upper.contains(m)) {
        tracing::warn!(child = name, "{line}");
    } else {
        tracing::info!(child = name, "{line}");
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
        // SAFETY: plain integer prctl.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            tracing::warn!("could not become a child subreaper: {}", io::Error::last_os_error());
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
