//! The API worker (`omni-api`) as a supervised child.
//!
//! Socket handover without a race: the gateway binds a Unix socket in a
//! private directory of its own (mode 0700, [`SocketDir`]) and passes the
//! listening socket to the worker as fd 3 (`OMNI_API_LISTEN_FD=3`), so the
//! address is known before the worker starts and nothing else can take it in
//! between. Only the gateway can connect to it: no local user reaches the
//! worker around the gateway (its client-address header, its limits), and a
//! proxied request costs the kernel less than over loopback TCP.
//!
//! Readiness is announced, not polled (s6's notification descriptor): the
//! write end of a pipe is the worker's fd 4 (`OMNI_API_READY_FD=4`), and the
//! worker writes a newline there once its migrations are applied and it
//! serves. A readiness check awaits that newline. A worker that closes the
//! pipe without one, or stays silent for [`ANNOUNCE_PATIENCE`] (a build or a
//! stand-in that does not announce), is checked with `GET /api/v1/health`
//! as well. Liveness, once ready, is always
//! `GET /api/v1/health` answering 200 (the worker checks its database there).
//! Once ready, the instance is published as the proxy's upstream; when its
//! run ends it is withdrawn. During a reload the new instance is the
//! *candidate* until it is ready.
//!
//! Started early: the first instance is spawned while PostgreSQL is still
//! starting ([`WorkerPolicy::prestart`]), with the read end of a third pipe
//! as fd 5 (`OMNI_API_START_FD=5`). It does what needs no database and
//! waits; the first `start` writes the newline that lets it connect. Its
//! process start thus overlaps PostgreSQL's instead of following it. If the
//! gateway stops first, the pipe closes and the worker exits by itself.
//!
//! Run as root, the gateway starts the worker as an unprivileged account
//! (`OMNI_API_USER`, by default PostgreSQL's): nothing that parses HTTP runs
//! as root. The worker logs JSON lines, which `process/child.rs` re-emits at their
//! own level under the gateway's single timestamp.
//!
//! Layer: above `serve` (it publishes its address to the proxy's
//! upstreams), `supervise`, `status`, `process` and `config`.

pub mod dev;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::Child;

use omni_contract::logging::LogFormat;
use omni_contract::probe;
use omni_contract::worker_settings::{self, Listen, WorkerSettings};

use crate::process::child::{self, ChildSpec, Output};
use crate::process::privilege::Account;
use crate::supervise::{self, CheckTiming, Policy, StopSignals};
use crate::serve::upstream::Upstreams;

/// The fd number the worker finds its listening socket on.
const LISTEN_FD: i32 = 3;
/// The fd number of the write end of the worker's readiness pipe.
const READY_FD: i32 = 4;
/// The fd number of the read end of a pre-started worker's start pipe.
const START_FD: i32 = 5;
/// The fd number of `OMNI_DECRYPT_IDENTITY_FILE`, opened for the worker.
const IDENTITY_FD: i32 = 6;
/// How long the worker may be silent on its readiness pipe before it is
/// also asked `GET /api/v1/health`: longer than an announcing worker takes
/// to apply a usual migration, short enough that one that never announces
/// still starts in reasonable time.
const ANNOUNCE_PATIENCE: Duration = Duration::from_secs(5);
/// A health answer takes microseconds; the supervisor's own check timeout is the real limit.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

pub struct WorkerPolicy {
    pub bin: PathBuf,
    /// What the worker is told (the contract); the listening descriptor is
    /// filled in for every start.
    pub settings: WorkerSettings,
    pub upstreams: Upstreams,
    /// How long a stopping worker may take to drain in-flight requests.
    pub drain: Duration,
    /// Who the worker runs as; switched to when the gateway is root.
    pub account: Account,
    /// Where the worker is in its lifecycle.
    instance: Instance,
    /// Where the worker's "do I lead?" (its health answer) is shown.
    board: Option<crate::status::Board>,
    /// Where the workers' sockets are, made at the first start.
    sockets: Option<SocketDir>,
    /// Numbers each instance's socket.
    spawned: u64,
}

/// The worker's lifecycle, as the policy sees it. The supervisor drives it:
/// `prestart` holds, `start` announces, `on_ready` serves, `on_run_end`
/// and `abandon_candidate` go back.
///
/// ```text
///   Idle ──prestart──▶ Held ──start──▶ Announcing ──on_ready──▶ Serving
///    ▲                                  │  ▲                       │
///    └────────── run ends ──────────────┘  └── start (a reload) ───┘
/// ```
enum Instance {
    /// Nothing started, or the run ended.
    Idle,
    /// Spawned ahead of its start ([`WorkerPolicy::prestart`]), waiting for its start signal.
    Held(Held),
    /// Started, not yet ready (first start, restart, or a reload's new
    /// instance, then beside the one in `replacing`).
    Announcing {
        addr: Arc<Path>,
        /// The read end of its readiness pipe until it announced itself (or
        /// closed the pipe without doing so), and when it was started.
        pipe: Option<(pipe::Receiver, Instant)>,
        /// The instance still serving during a reload.
        replacing: Option<Serving>,
    },
    /// Published as the proxy's upstream.
    Serving(Serving),
}

/// An instance published to the proxy: its socket and generation.
#[derive(Clone)]
struct Serving {
    addr: Arc<Path>,
    generation: u64,
}

impl Instance {
    /// The instance that serves now, if one does.
    fn serving(&self) -> Option<Serving> {
        match self {
            Instance::Serving(s) => Some(s.clone()),
            Instance::Announcing { replacing, .. } => replacing.clone(),
            Instance::Idle | Instance::Held(_) => None,
        }
    }
}

/// A worker spawned ahead of its start ([`WorkerPolicy::prestart`]).
struct Held {
    child: Child,
    addr: Arc<Path>,
    ready_read: pipe::Receiver,
    /// Write end of its start pipe: a newline starts it, dropping it stops it.
    go: std::fs::File,
}

impl WorkerPolicy {
    pub fn new(bin: PathBuf, settings: WorkerSettings, upstreams: Upstreams, drain: Duration, account: Account) -> Self {
        WorkerPolicy { bin, settings, upstreams, drain, account, instance: Instance::Idle, board: None, sockets: None, spawned: 0 }
    }

    /// Shows on `board` whether the serving worker leads (several gateways
    /// on one database), as each liveness check reads it.
    pub fn reporting_leader_to(mut self, board: crate::status::Board) -> Self {
        self.board = Some(board);
        self
    }

    /// Spawns the first instance now, to wait for its database: the first
    /// [`Policy::start`] only signals it. A failure here is logged and left
    /// to that start, which spawns one the usual way.
    pub async fn prestart(&mut self) {
        let (start_read, start_write) = match pipe_pair("start") {
            Ok(pair) => pair,
            Err(e) => return tracing::warn!("could not pre-start the API worker: {e:#}"),
        };
        match self.spawn(Some(start_read)).await {
            Ok((child, addr, ready_read)) => {
                tracing::info!("started API worker (pid {}) on {} as user {}; it waits for PostgreSQL to be ready before it connects", child.id().unwrap_or(0), addr.display(), self.account.name);
                self.instance = Instance::Held(Held { child, addr, ready_read, go: std::fs::File::from(start_write) });
            }
            Err(e) => tracing::warn!("could not pre-start the API worker: {e:#}"),
        }
    }

    /// Spawns an instance; with `start_read`, one that waits for its start signal.
    async fn spawn(&mut self, start_read: Option<OwnedFd>) -> Result<(Child, Arc<Path>, pipe::Receiver)> {
        if self.sockets.is_none() {
            self.sockets = Some(SocketDir::make()?);
        }
        let dir = self.sockets.as_ref().expect("made above");
        self.spawned += 1;
        let addr: Arc<Path> = dir.path.join(format!("api-{}.sock", self.spawned)).into();
        let _ = std::fs::remove_file(&addr);
        let listener = UnixListener::bind(&addr).with_context(|| format!("could not listen on {} for the worker", addr.display()))?;
        let mut spec = ChildSpec::new("api", &self.bin);
        let (ready_read, ready_write) = readiness_pipe()?;
        let mut settings = self.settings.clone();
        settings.listen = Listen::InheritedFd(LISTEN_FD);
        settings.ready_fd = Some(READY_FD);
        settings.start_fd = start_read.is_some().then_some(START_FD);
        // The private key restores of encrypted logical backups need
        // (OMNI_ENCRYPT_LOCAL) is often root's alone: opened here, handed over.
        let identity = match &settings.decrypt_identity_file {
            Some(path) => match std::fs::File::open(path) {
                Ok(file) => Some(OwnedFd::from(file)),
                Err(e) => {
                    tracing::warn!("OMNI_DECRYPT_IDENTITY_FILE={}: cannot open it for the API worker ({e}); restores of encrypted logical backups through the API are refused until it can", path.display());
                    None
                }
            },
            None => None,
        };
        settings.decrypt_identity_fd = identity.is_some().then_some(IDENTITY_FD);
        // JSON, so process/child.rs can re-emit each line at its level under one
        // timestamp; the gateway's own LOG_FORMAT decides what operators see.
        settings.log_format = LogFormat::Json;
        // Only the contract's values reach the worker, never a stray one
        // inherited from the gateway's own environment.
        spec.env_remove = worker_settings::vars::ALL.iter().map(Into::into).collect();
        spec.env = settings.to_env().into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        spec.env.extend(self.account.login_env());
        spec.run_as = self.account.run_as();
        spec.pass_fds = vec![(OwnedFd::from(listener), LISTEN_FD), (ready_write, READY_FD)];
        if let Some(fd) = start_read {
            spec.pass_fds.push((fd, START_FD));
        }
        if let Some(fd) = identity {
            spec.pass_fds.push((fd, IDENTITY_FD));
        }
        spec.death_signal = Signal::SIGKILL;
        spec.output = Output::Json;
        let child = child::spawn(spec).await.map_err(|e| {
            // A binary that is missing or not executable stays so until someone acts: no retry can fix it.
            let unfixable = matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied);
            let e = anyhow::Error::new(e).context(format!("could not start {}", self.bin.display()));
            if unfixable { supervise::permanent(e) } else { e }
        })?;
        Ok((child, addr, ready_read))
    }

    /// The pre-started instance, told to start, if it is still alive.
    fn release_held(&mut self) -> Option<(Child, Arc<Path>, pipe::Receiver)> {
        let Instance::Held(mut held) = std::mem::replace(&mut self.instance, Instance::Idle) else { return None };
        if !matches!(held.child.try_wait(), Ok(None)) {
            tracing::warn!("the pre-started API worker exited before PostgreSQL was ready; starting another");
            if let Some(pid) = held.child.id() {
                child::forget(pid);
            }
            return None;
        }
        if let Err(e) = std::io::Write::write_all(&mut held.go, b"\n") {
            tracing::warn!("could not signal the pre-started API worker ({e}); starting another");
            return None;
        }
        Some((held.child, held.addr, held.ready_read))
    }
}

/// The gateway's private directory for its workers' sockets
/// ([`private_temp_dir`](crate::process::privilege::private_temp_dir):
/// mode 0700, the gateway's own account; the worker gets its listening
/// socket as a descriptor and never needs the path). Removed when the
/// gateway stops.
struct SocketDir {
    path: PathBuf,
}

impl SocketDir {
    fn make() -> Result<SocketDir> {
        Ok(SocketDir { path: crate::process::privilege::private_temp_dir("omni-api", None)? })
    }

    /// Removes every socket's name but `keep`'s (a replaced or crashed
    /// instance's), so restarts do not pile them up; the maker file stays.
    fn remove_all_but(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.path) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path != keep && entry.file_name() != crate::process::privilege::MAKER_FILE {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What the readiness pipe said.
enum Announcement {
    /// A newline: the worker serves.
    Ready,
    /// Closed without a newline: the worker exited, or does not announce.
    Closed,
}

/// Waits for the worker's newline. Cancel-safe: the supervisor bounds each
/// check with a timeout, and the next check goes on reading the same pipe.
async fn announcement(pipe: &mut pipe::Receiver) -> Announcement {
    let mut buf = [0u8; 64];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return Announcement::Closed,
            Ok(n) if buf[..n].contains(&b'\n') => return Announcement::Ready,
            Ok(_) => {}
        }
    }
}

/// A pipe whose ends are close-on-exec: only the child's dup of one end survives exec.
fn pipe_pair(what: &str) -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from).with_context(|| format!("creating the worker's {what} pipe"))
}

/// The readiness pipe: its read end watched by the gateway, its write end for the worker.
fn readiness_pipe() -> Result<(pipe::Receiver, OwnedFd)> {
    let (read, write) = pipe_pair("readiness")?;
    Ok((pipe::Receiver::from_owned_fd(read).context("watching the worker's readiness pipe")?, write))
}

/// `OMNI_API_BIN`, or `omni-api` next to the running gateway.
pub fn locate_binary(configured: Option<&Path>) -> Result<PathBuf> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe().context("cannot locate the running executable")?.with_file_name("omni-api"),
    };
    if !path.is_file() {
        bail!(
            "the API worker binary {} does not exist. Build it with `cargo build --release --workspace` (or `make run`), or set OMNI_API_BIN to its path",
            path.display()
        );
    }
    Ok(path)
}

/// The account the worker runs as, with what it must read and write made
/// accessible to it (when the gateway is root): the backup directory, the
/// onboarding settings file, the binary itself; a UI directory it cannot
/// read is reported.
pub fn prepare_account(config: &crate::config::Config, bin: &Path) -> Result<Account> {
    let account = crate::process::privilege::worker_account(&config.api_user)?;
    if account.switch {
        tracing::info!("running as root: the API worker will run as user {} (uid {})", account.name, account.uid);
        crate::process::privilege::check_executable(bin, &account).context("OMNI_API_BIN")?;
        let memory_mode = matches!(&config.database, crate::config::Database::Embedded(e) if e.memory_mode);
        // Memory mode leaves nothing on disk: directories that are not
        // there are not created for a run that keeps nothing (the worker
        // then reports that it cannot create them, should it need them).
        if memory_mode && !config.backup_dir.is_dir() {
            tracing::info!("memory mode: {} is not created; backups through the API need it, writable by user {}", config.backup_dir.display(), account.name);
        } else {
            crate::process::privilege::prepare_backup_dir(&config.backup_dir, &account)?;
        }
        if memory_mode && !config.settings_file.parent().is_some_and(Path::is_dir) {
            tracing::info!("memory mode: the directory of {} is not created; onboarding needs it to save settings", config.settings_file.display());
        } else {
            crate::process::privilege::prepare_settings_file(&config.settings_file, &account)?;
        }
        if let Some(ui_dir) = &config.ui_dir {
            crate::process::privilege::warn_unless_readable(ui_dir, &account, "OMNI_UI_DIR");
        }
    }
    Ok(account)
}

impl Policy for WorkerPolicy {
    fn name(&self) -> &'static str {
        "api"
    }

    async fn start(&mut self) -> Result<Child> {
        let (child, addr, ready_read) = match self.release_held() {
            Some(held) => held,
            None => {
                let (child, addr, ready_read) = self.spawn(None).await?;
                tracing::info!(component = "api", "started API worker (pid {}) on {} as user {}", child.id().unwrap_or(0), addr.display(), self.account.name);
                (child, addr, ready_read)
            }
        };
        let replacing = self.instance.serving();
        self.instance = Instance::Announcing { addr, pipe: Some((ready_read, Instant::now())), replacing };
        Ok(child)
    }

    async fn check(&mut self) -> Result<()> {
        if let Instance::Announcing { pipe: ready_pipe @ Some(_), .. } = &mut self.instance {
            let (pipe, started) = ready_pipe.as_mut().expect("matched Some");
            let started = *started;
            let patience = ANNOUNCE_PATIENCE.saturating_sub(started.elapsed());
            match tokio::time::timeout(patience, announcement(pipe)).await {
                Ok(Announcement::Ready) => {
                    tracing::info!(component = "api", "API worker announced it is ready ({} ms after its start)", started.elapsed().as_millis());
                    *ready_pipe = None;
                    return Ok(());
                }
                Ok(Announcement::Closed) => {
                    tracing::debug!("the API worker closed its readiness pipe without announcing; checking GET /api/v1/health instead");
                    *ready_pipe = None;
                }
                // Silent so far: keep listening (a later newline still
                // counts), and ask over HTTP meanwhile.
                Err(_) => {}
            }
        }
        let (addr, serving) = match &self.instance {
            Instance::Announcing { addr, .. } => (addr.clone(), false),
            Instance::Serving(s) => (s.addr.clone(), true),
            Instance::Idle | Instance::Held(_) => bail!("no worker instance to check"),
        };
        let leader = health(addr).await?;
        // A candidate's answer is not shown before it serves.
        if let (Some(board), true) = (&self.board, serving) {
            board.set_leader(leader);
        }
        Ok(())
    }

    async fn on_ready(&mut self) -> Result<()> {
        if let Instance::Announcing { addr, .. } = &self.instance {
            let addr = addr.clone();
            let generation = self.upstreams.publish(addr.clone());
            // The instance it replaced, if any, is no longer connected to:
            // its pooled connections stay open, its socket's name goes.
            if let Some(dir) = &self.sockets {
                dir.remove_all_but(&addr);
            }
            self.instance = Instance::Serving(Serving { addr, generation });
        }
        Ok(())
    }

    fn on_run_end(&mut self) {
        if let Some(board) = &self.board {
            board.set_leader(None);
        }
        if let Some(serving) = self.instance.serving() {
            self.upstreams.withdraw(serving.generation);
        }
        // A pre-started instance not yet released stays held.
        if !matches!(self.instance, Instance::Held(_)) {
            self.instance = Instance::Idle;
        }
    }

    fn abandon_candidate(&mut self) {
        if let Instance::Announcing { replacing, .. } = &self.instance {
            self.instance = match replacing.clone() {
                Some(serving) => Instance::Serving(serving),
                None => Instance::Idle,
            };
        }
    }

    fn stop_signals(&self) -> StopSignals {
        StopSignals { first: Signal::SIGTERM, second: None, grace: self.drain }
    }

    fn timing(&self) -> CheckTiming {
        CheckTiming {
            // Only paces the GET /api/v1/health fallback: an announcing
            // worker's check waits on its pipe, up to `check_timeout` at a time.
            ready_poll: Duration::from_millis(5),
            start_timeout: Duration::from_secs(60),
            live_interval: Duration::from_secs(2),
            check_timeout: Duration::from_secs(3),
            failures_before_restart: 3,
        }
    }
}

/// `GET /api/v1/health` over a fresh connection; `Ok` on a 200, with the
/// answer's `leader` (absent from a worker that does not say).
async fn health(addr: Arc<Path>) -> Result<Option<bool>> {
    let answer = probe::get(probe::Endpoint::Unix(addr), "/api/v1/health", HEALTH_TIMEOUT).await?;
    let doc = serde_json::from_slice::<serde_json::Value>(&answer.body).ok();
    match answer.status {
        200 => Ok(doc.and_then(|doc| doc["leader"].as_bool())),
        // The worker is fine: its database is promoting a new primary.
        503 if doc.as_ref().is_some_and(|doc| doc["database"] == "failing_over") => Ok(doc.and_then(|doc| doc["leader"].as_bool())),
        code => bail!("health answered {code}: {}", answer.text()),
    }
}
