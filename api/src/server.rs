//! Start-up and shutdown: database, migrations, API key, listener, serving.
//!
//! Readiness is announced, so the gateway need not poll: when started with
//! `OMNI_API_READY_FD`, the worker writes a newline to that descriptor once
//! migrations are applied and the listener is about to be served, then
//! closes it (the s6 notification protocol). Started by hand, without it,
//! `GET /api/v1/health` is how to tell.
//!
//! Started early by the gateway, with `OMNI_API_START_FD`, the worker does
//! what needs no database (settings, logging, pool, listener) and then waits
//! for a newline on that descriptor before it connects.
//!
//! Shutdown is one mechanism: a future that completes on SIGTERM or SIGINT,
//! handed to axum's graceful shutdown, which stops accepting, lets in-flight
//! requests finish, and then returns so the process exits 0.

use std::{
    fs::File,
    io::Write,
    net::TcpListener as StdListener,
    os::fd::{FromRawFd, RawFd},
    os::unix::net::UnixListener as StdUnixListener,
    time::Duration,
};

use anyhow::{bail, Context};
use omni_contract::{
    backups, migrations,
    sqlite,
    worker_settings::{Listen, WorkerSettings},
};
use tokio::net::{TcpListener, UnixListener};

use crate::{
    auth,
    db::Db,
    routes,
};

/// How long start-up waits for the database before giving up.
const DATABASE_PATIENCE: Duration = Duration::from_secs(30);
/// How long a stop waits for the leadership session to end cleanly.
const LEADERSHIP_STOP: Duration = Duration::from_secs(3);

pub async fn run(mut config: WorkerSettings) -> anyhow::Result<()> {
    if config.setup_token.is_none() {
        config.setup_token = Some(routes::make_setup_token());
    }
    // Taken first, so no child started later (pg_dump) inherits them.
    let ready = config.ready_fd.and_then(|fd| pipe_descriptor(fd, "OMNI_API_READY_FD", "readiness will not be announced (GET /api/v1/health still tells)"));
    let start = config.start_fd.and_then(|fd| pipe_descriptor(fd, "OMNI_API_START_FD", "connecting to the database at once"));
    if let (Some(fd), Some(path)) = (config.decrypt_identity_fd, &config.decrypt_identity_file) {
        take_identity(fd, path);
    }
    tracing::info!(
        ui_dir = %config.ui_dir.as_deref().map_or("built into omni-api".into(), |d| d.display().to_string()),
        backup_dir = %config.backup_dir.display(),
        data_root = %config.data_root.display(),
        "starting omni-api"
    );
    if let Some(path) = sqlite::find(&config.data_root) {
        tracing::warn!(path = %path.display(), "found an SQLite database from an earlier version; see GET /api/v1/migration/status");
    }

    let db = Db::connect(&config.database_url, config.pool_size)?;
    let listener = listener(&config.listen)?;
    // The router (and its OpenAPI document) needs no database: built now,
    // while a pre-started worker still waits for its start signal.
    let (app, api_key_slot) = routes::app(db.clone(), config.clone());
    if let Some(start) = start {
        if !start_signal(start).await {
            tracing::info!("the gateway withdrew this start before the database was ready; exiting");
            return Ok(());
        }
    }
    let mut client = db.client_at_start(DATABASE_PATIENCE).await?;
    let applied = migrations::apply(&mut client).await?;
    if applied.is_empty() {
        tracing::info!("database schema is up to date");
    } else {
        tracing::info!(?applied, "applied migrations");
    }
    let api_key = auth::resolve(&client, config.api_key.as_deref()).await?;
    let configured = api_key.is_configured();
    let _ = api_key_slot.set(api_key);
    announce_setup_token(&client, &config, configured).await?;
    drop(client);

    let leadership = db.lead(&config.database_url);
    start_backups(&config, leadership.clone());
    crate::sessions::spawn_purge(db.clone());

    let address = listener.describe();
    if let Some(file) = ready {
        announce_ready(file);
        tracing::info!(%address, "listening; readiness announced to the gateway");
    } else {
        tracing::info!(%address, "listening; ready when GET /api/v1/health answers 200");
    }
    match listener {
        // The peer address is the client's when no gateway stands in between (rate_limit::client_address).
        Bound::Tcp(listener) => axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving HTTP")?,
        // Only the gateway connects here, and it always says who the client is.
        Bound::Unix(listener) => axum::serve(listener, app.into_make_service()).with_graceful_shutdown(shutdown_signal()).await.context("serving HTTP")?,
    }
    // The leadership session renews its lease every second: ended between
    // two renewals, so the process never exits while PostgreSQL is still
    // sending it an answer (which PostgreSQL logs as a lost client).
    leadership.stop(LEADERSHIP_STOP).await;
    tracing::info!("stopped");
    Ok(())
}

/// While the install is not set up, logs the one-time setup token and the
/// link that carries it (`…/setup#token=…`): only someone who reads this log
/// (or the token file, or `omni-gateway doctor`) can finish setup from
/// another machine.
async fn announce_setup_token(client: &crate::db::Client, config: &WorkerSettings, configured: bool) -> anyhow::Result<()> {
    if configured {
        return Ok(());
    }
    #[derive(serde::Deserialize, Default)]
    struct Completed {
        #[serde(default)]
        completed: bool,
    }
    let setup: Completed = crate::settings::get(client, crate::settings::SETUP).await.map_err(|e| anyhow::anyhow!("{}", e.detail))?.unwrap_or_default();
    if setup.completed {
        return Ok(());
    }
    let token = config.setup_token.as_deref().unwrap_or_default();
    let base = config.public_url.clone().or_else(|| config.gateway_url.clone()).unwrap_or_else(|| match &config.listen {
        Listen::Bind(address) => format!("http://{address}"),
        Listen::InheritedFd(_) => "http://127.0.0.1:8882".to_owned(),
    });
    tracing::info!("setup token: {token}");
    tracing::info!("this install is not set up yet: open {base}/setup#token={token} to set it up (from another machine, use this machine's address)");
    Ok(())
}

/// Takes ownership of the descriptor `fd` named by `variable`, if it is an
/// open pipe or FIFO, and marks it close-on-exec. Anything else is reported
/// (with what happens instead, `fallback`) and left alone: owning (and later
/// closing) a descriptor that is not ours could close a file some library opened.
fn pipe_descriptor(fd: RawFd, variable: &str, fallback: &str) -> Option<File> {
    // SAFETY: fstat writes into the zeroed struct; an invalid fd is an error return.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
        tracing::warn!(fd, "{variable} names no open pipe; {fallback}");
        return None;
    }
    // SAFETY: plain fcntl on an open descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open, and the gateway handed it to us alone.
    Some(unsafe { File::from_raw_fd(fd) })
}

/// Reads the identity file the gateway opened for us (`OMNI_DECRYPT_IDENTITY_FD`)
/// and closes it; its keys open encrypted backups for restores. Anything but
/// an open regular file is left alone, and restores then open `path` themselves.
fn take_identity(fd: RawFd, path: &std::path::Path) {
    if !std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok_and(|m| m.is_file()) {
        tracing::warn!(fd, "OMNI_DECRYPT_IDENTITY_FD names no open file; restores of encrypted backups open OMNI_DECRYPT_IDENTITY_FILE themselves");
        return;
    }
    // SAFETY: the descriptor is open, and the gateway handed it to us alone.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let mut text = String::new();
    let read = std::io::Read::read_to_string(&mut file, &mut text).map_err(|e| e.to_string());
    match read.and_then(|_| omni_contract::crypt::Keys::parse(&text, path, "OMNI_DECRYPT_IDENTITY_FILE").map_err(|e| e.to_string())) {
        Ok(keys) => backups::hand_over_identity(keys),
        Err(error) => tracing::warn!(%error, "OMNI_DECRYPT_IDENTITY_FILE: the file handed over cannot be read; restores of encrypted backups open it themselves"),
    }
}

/// Waits on the start pipe: true at a newline (the database accepts
/// connections), false when the pipe closes without one (the gateway
/// stopped, or started another instance instead).
async fn start_signal(mut pipe: File) -> bool {
    tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 64];
        loop {
            match std::io::Read::read(&mut pipe, &mut buf) {
                Ok(0) => return false,
                Ok(n) if buf[..n].contains(&b'\n') => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Writes the newline that says "ready" and closes the descriptor. A gateway
/// that went away is no reason to stop serving, so a failure is only logged.
fn announce_ready(mut file: File) {
    if let Err(error) = file.write_all(b"\n") {
        tracing::warn!(%error, "could not announce readiness on OMNI_API_READY_FD");
    }
}

/// Cleans up after interrupted backups and starts the schedule, if any (it
/// runs while this worker leads).
fn start_backups(config: &WorkerSettings, leadership: omni_contract::leader::Leadership) {
    let backups = std::sync::Arc::new(backups::Backups::from_settings(config));
    match backups.remove_stale_partials() {
        Ok(_) | Err(backups::BackupError::Busy) => {}
        Err(error) => tracing::warn!(%error, "backups: cannot prepare the backup directory"),
    }
    if let Some(every) = config.backup_interval {
        backups::schedule::spawn(backups, every, leadership);
    }
}

/// Where the worker listens: TCP when started by hand (`OMNI_API_LISTEN`),
/// the gateway's Unix socket (or a TCP one) when handed over.
enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Bound {
    fn describe(&self) -> String {
        match self {
            Bound::Tcp(l) => l.local_addr().map_or_else(|_| "a TCP socket".to_owned(), |a| a.to_string()),
            Bound::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "the gateway's Unix socket".to_owned()),
        }
    }
}

fn listener(listen: &Listen) -> anyhow::Result<Bound> {
    match *listen {
        Listen::Bind(address) => {
            let std_listener = StdListener::bind(address)
                .with_context(|| format!("OMNI_API_LISTEN: cannot listen on {address}; is another process using it?"))?;
            std_listener.set_nonblocking(true).context("making the listening socket non-blocking")?;
            Ok(Bound::Tcp(TcpListener::from_std(std_listener).context("registering the listening socket")?))
        }
        Listen::InheritedFd(fd) => {
            // Check the descriptor is a listening socket before trusting it:
            // from_raw_fd cannot tell.
            let mut value: libc::c_int = 0;
            let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `length` bytes into `value`.
            let rc = unsafe {
                libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, (&mut value as *mut libc::c_int).cast(), &mut length)
            };
            if rc != 0 || value == 0 {
                bail!("OMNI_API_LISTEN_FD: file descriptor {fd} is not a listening socket");
            }
            let mut domain: libc::c_int = 0;
            let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: as above.
            let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&mut domain as *mut libc::c_int).cast(), &mut length) };
            if rc != 0 {
                bail!("OMNI_API_LISTEN_FD: cannot tell the kind of file descriptor {fd}");
            }
            // Keep it out of children we spawn later (pg_dump for backups).
            // SAFETY: plain fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            if domain == libc::AF_UNIX {
                // SAFETY: the gateway handed this descriptor to us alone; we own it from here on.
                let listener = unsafe { StdUnixListener::from_raw_fd(fd) };
                listener.set_nonblocking(true).context("making the listening socket non-blocking")?;
                return Ok(Bound::Unix(UnixListener::from_std(listener).context("registering the listening socket")?));
            }
            // SAFETY: as above.
            let listener = unsafe { StdListener::from_raw_fd(fd) };
            listener.set_nonblocking(true).context("making the listening socket non-blocking")?;
            Ok(Bound::Tcp(TcpListener::from_std(listener).context("registering the listening socket")?))
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    let name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down: no new connections, finishing requests in flight");
}
