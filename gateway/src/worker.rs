//! The API worker (`omni-api`) as a supervised child.
//!
//! Port handover without a race: the gateway binds `127.0.0.1:0` itself and
//! passes the listening socket to the worker as fd 3 (`OMNI_API_LISTEN_FD=3`),
//! so the port is known before the worker starts and nothing else can take
//! it in between. Readiness and liveness are `GET /api/v1/health` answering
//! 200 (the worker checks its database there). Once ready, the instance is
//! published as the proxy's upstream; when its run ends it is withdrawn.
//! During a reload the new instance is the *candidate* until it is ready.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use tokio::process::Child;

use omni_contract::probe;
use omni_contract::worker_settings::{self, Listen, WorkerSettings};

use crate::child::{self, ChildSpec};
use crate::supervisor::{self, CheckTiming, Policy, StopSignals};
use crate::upstream::Upstreams;

/// The fd number the worker finds its listening socket on.
const LISTEN_FD: i32 = 3;
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
    /// The instance currently published: its address and generation.
    current: Option<(SocketAddr, u64)>,
    /// A started instance not yet ready (first start, restart, or reload).
    candidate: Option<SocketAddr>,
}

impl WorkerPolicy {
    pub fn new(bin: PathBuf, settings: WorkerSettings, upstreams: Upstreams, drain: Duration) -> Self {
        WorkerPolicy { bin, settings, upstreams, drain, current: None, candidate: None }
    }
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

impl Policy for WorkerPolicy {
    fn name(&self) -> &'static str {
        "api"
    }

    async fn start(&mut self) -> Result<Child> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a local port for the worker")?;
        let addr = listener.local_addr()?;
        let mut spec = ChildSpec::new("api", &self.bin);
        let mut settings = self.settings.clone();
        settings.listen = Listen::InheritedFd(LISTEN_FD);
        // Only the contract's values reach the worker, never a stray one
        // inherited from the gateway's own environment.
        spec.env_remove = worker_settings::vars::ALL.iter().map(Into::into).collect();
        spec.env = settings.to_env().into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        spec.pass_fd = Some((OwnedFd::from(listener), LISTEN_FD));
        spec.death_signal = Signal::SIGKILL;
        let child = child::spawn(spec).await.map_err(|e| {
            // A binary that is missing or not executable stays so until someone acts: no retry can fix it.
            let unfixable = matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied);
            let e = anyhow::Error::new(e).context(format!("could not start {}", self.bin.display()));
            if unfixable { supervisor::permanent(e) } else { e }
        })?;
        tracing::info!("started API worker (pid {}) on {addr}", child.id().unwrap_or(0));
        self.candidate = Some(addr);
        Ok(child)
    }

    async fn check(&mut self) -> Result<()> {
        let addr = self.candidate.or(self.current.map(|(a, _)| a)).context("no worker instance to check")?;
        health(addr).await
    }

    async fn on_ready(&mut self) -> Result<()> {
        if let Some(addr) = self.candidate.take() {
            let generation = self.upstreams.publish(addr);
            self.current = Some((addr, generation));
        }
        Ok(())
    }

    fn on_run_end(&mut self) {
        if let Some((_, generation)) = self.current.take() {
            self.upstreams.withdraw(generation);
        }
        self.candidate = None;
    }

    fn abandon_candidate(&mut self) {
        self.candidate = None;
    }

    fn stop_signals(&self) -> StopSignals {
        StopSignals { first: Signal::SIGTERM, second: None, grace: self.drain }
    }

    fn timing(&self) -> CheckTiming {
        CheckTiming {
            ready_poll: Duration::from_millis(5),
            start_timeout: Duration::from_secs(60),
            live_interval: Duration::from_secs(2),
            check_timeout: Duration::from_secs(3),
            failures_before_restart: 3,
        }
    }
}

/// `GET /api/v1/health` over a fresh connection; `Ok` on a 200.
async fn health(addr: SocketAddr) -> Result<()> {
    let answer = probe::get(addr, "/api/v1/health", HEALTH_TIMEOUT).await?;
    match answer.status {
        200 => Ok(()),
        code => bail!("health answered {code}: {}", answer.text()),
    }
}
