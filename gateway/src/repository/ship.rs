//! The shipper: what is complete locally goes to the repository, and what
//! the repository has confirmed may be deleted locally.
//!
//! Two loops, so that a large base backup never holds back the WAL (the
//! off-site recovery point):
//!
//! - **WAL**, every `OMNI_REPOSITORY_WAL_INTERVAL` (default 1 s): the
//!   `.history` files and completed segments of every stream directory of
//!   the current generation (`wal/<segment>.lz4`), then the new bytes of each
//!   `.partial` segment as an immutable chunk (`wal/<segment>.chunks/<from>-<to>`).
//!   The end of the new bytes is the streamer's flush position as PostgreSQL
//!   reports it (`pg_stat_replication.flush_lsn` of `omni_wal`: what
//!   `pg_receivewal --synchronous` has flushed to the file); when PostgreSQL
//!   cannot be asked (it is stopping, a retired stream), the last non-zero
//!   byte of the file, which never ships bytes not yet written (the file is
//!   zero-padded) but may hold back a record's trailing zeros until more WAL comes.
//! - **Backups**, every 5 s: each verified base backup (its files, then
//!   `manifest.json` with the size and SHA-256 of each, last) and each
//!   logical backup of `OMNI_BACKUP_DIR` that has its `.sha256` (the file,
//!   then its `.sha256`).
//!
//! What the repository confirmed is remembered in `OMNI_WAL_DIR/repository.json`
//! (written whole to a temporary file, flushed, renamed), keyed by the
//! repository's URL: a restart uploads nothing twice. Without it (lost, or
//! another URL) the confirmed set is rebuilt by listing the repository.
//! Chunk progress is not recorded: a restart lists the chunks of each
//! `.partial` segment instead.
//!
//! Failures are retried with a capped backoff (the interval doubled per
//! failure in a row, at most 30 s); the service never stops for them. An
//! object that exists with other content stops every upload (never
//! overwritten) until the gateway restarts; `/gateway/status` says which.
//!
//! It runs in its own shutdown stage, after PostgreSQL's: while the worker,
//! the streamer and PostgreSQL stop it keeps shipping, and once they are
//! down one last WAL round ships the streamer's last bytes.
//!
//! With `OMNI_ENCRYPT_*` every object is sealed by the store layer
//! (`store::Repository::put_object`, `put_file`; see `crypt.rs`), but for
//! files already sealed on this machine (`OMNI_ENCRYPT_LOCAL`: a base
//! backup's `<file>.age`, a segment's `<segment>.lz4.age`), which hold the
//! object's exact format and go as they are (`put_sealed_file`); the
//! manifests and `.history` files it uploads are also kept plain in
//! `OMNI_WAL_DIR/repository-plain/`, for retention and the window to read.
//! `OMNI_BACKUP_HEARTBEAT_URL` (`heartbeat.rs`) hears of each base and
//! logical backup confirmed, of WAL rounds that succeeded with a write
//! confirmed since the last success ping (at most once per interval), and
//! of each failed round (`/fail`, once per interval while it fails).
//!
//! Pitr's retention asks [`Shipper::confirms`] (through
//! `pitr::archive::set_deletion_check`) before it deletes a segment or a
//! base backup: nothing local goes before its upload is confirmed. Logical
//! backups are deleted by the worker's retention (`omni_contract::backups`,
//! another process): each one confirmed gets `<name>.uploaded` beside it
//! (`backups::mark_uploaded`), which that retention requires, and once a
//! mark is new the shipper runs that retention itself (`Backups::prune`),
//! so what it kept waiting goes without waiting for the next backup.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use omni_contract::backups::{self, BackupError, Backups};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::config::RepositoryConfig;
use super::layout;
use super::heartbeat::Heartbeat;
use super::store::{self, Put, Repository, RepositoryError};
use crate::pitr::{archive, base, generation::Identity};
use crate::status::repository::{RepositoryState, RepositoryView};
use crate::status::Board;
use crate::supervise::shutdown::Stage;

/// The state file, in `OMNI_WAL_DIR`.
pub const STATE_FILE: &str = "repository.json";
/// Between two rounds of the backups loop.
const BACKUPS_EVERY: Duration = Duration::from_secs(5);
/// The longest wait between two tries after failures.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// What `repository.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    /// The repository these confirmations are of.
    url: String,
    /// Confirmed objects, by name.
    objects: BTreeMap<String, Confirmed>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Confirmed {
    size: u64,
    /// Lowercase hex; empty when the entry was rebuilt by listing.
    #[serde(default)]
    sha256: String,
}

/// What one loop left waiting in its last round.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    objects: u64,
    bytes: u64,
    oldest: Option<SystemTime>,
}

impl Pending {
    fn add(&mut self, bytes: u64, since: Option<SystemTime>) {
        self.objects += 1;
        self.bytes += bytes;
        self.oldest = match (self.oldest, since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loop {
    Wal = 0,
    Backups = 1,
}

/// The shipper's memory, shared by its loops and by retention's question.
#[derive(Debug, Default)]
struct State {
    file: StateFile,
    /// The file needs writing.
    dirty: bool,
    /// The repository must be listed to rebuild `file` (none was found, or
    /// it was of another URL) before anything is uploaded.
    needs_listing: bool,
    /// The current generation (`<sysid>-pg<major>`), once the archive has an identity.
    generation: Option<String>,
    /// Per `.partial` segment: bytes already in chunks, and the file's
    /// modification time when they were read (unchanged: nothing to read).
    chunks: HashMap<String, (u64, Option<SystemTime>)>,
    pending: [Pending; 2],
    /// Each loop's current failure streak and its last error.
    failing: [Option<(u32, String)>; 2],
    /// When retention in the repository last ran; due again after a new
    /// base backup is confirmed, or an hour later.
    last_retention: Option<Instant>,
    retention_due: bool,
    /// Whether the store was asked if it honours conditional writes.
    conditional_checked: bool,
    /// The logical backups' retention is to run (it found the directory busy).
    prune_due: bool,
    /// A `<name>.uploaded` mark could not be written (said once until one is).
    mark_failing: bool,
}

/// The off-site shipper; cheap to clone.
#[derive(Clone)]
pub struct Shipper {
    repo: Repository,
    settings: RepositoryConfig,
    /// `OMNI_WAL_DIR` when WAL is streamed; `None`: logical backups only.
    wal_dir: Option<PathBuf>,
    backup_dir: PathBuf,
    /// The logical backups' retention (`OMNI_BACKUP_KEEP`), run once their
    /// uploads are confirmed.
    logical: Backups,
    /// Where the streamer's flush position is asked (the embedded cluster).
    pg: Option<tokio_postgres::Config>,
    state: Arc<Mutex<State>>,
    view: Arc<Mutex<RepositoryView>>,
    /// Set by a conflict: no upload until the gateway restarts.
    halted: Arc<AtomicBool>,
    /// `OMNI_BACKUP_HEARTBEAT_URL`'s pings.
    heartbeat: Option<Arc<Heartbeat>>,
    /// A remote write was confirmed since the last success ping: a
    /// keepalive may say "alive" (never without one).
    confirmed_since_ping: Arc<AtomicBool>,
}

impl Shipper {
    /// `backups`: `OMNI_BACKUP_DIR` and `OMNI_BACKUP_KEEP`.
    pub fn new(repo: Repository, settings: RepositoryConfig, wal_dir: Option<PathBuf>, backups: (PathBuf, usize), pg: Option<tokio_postgres::Config>) -> Shipper {
        let url = repo.display();
        let (backup_dir, backup_keep) = backups;
        let logical = Backups::new(backup_dir.clone(), None, String::new(), backup_keep).uploaded_to(Some(url.clone()));
        let file = wal_dir.as_deref().and_then(load_state).filter(|f| f.url == url);
        let needs_listing = file.is_none();
        let file = file.unwrap_or(StateFile { url: url.clone(), objects: BTreeMap::new() });
        let mut view = RepositoryView::new(url, settings.queue_max_bytes, settings.delete, settings.window.as_secs());
        let heartbeat = settings.heartbeat_url.as_deref().and_then(|u| Heartbeat::new(u, settings.heartbeat_interval).ok()).map(Arc::new);
        view.encryption = match repo.encrypts() {
            true => repo.sealer_recipients().map_or_else(|e| format!("age (its recipients cannot be read now: {e})"), |r| format!("age, to {}", r.iter().map(|k| super::crypt::short(k)).collect::<Vec<_>>().join(", "))),
            false => "off".into(),
        };
        if !repo.encrypts() && super::config::is_public_cloud(repo.location()) {
            let warning = format!(
                "{} is a public cloud's store and nothing is encrypted: the provider, and anyone with the bucket's credentials, can read every backup. Set OMNI_ENCRYPT_RECIPIENTS (age public keys) or OMNI_ENCRYPT_PASSPHRASE_FILE",
                repo.display()
            );
            tracing::warn!("off-site repository: {warning}");
            view.warnings.push(warning);
        }
        if let Some(beat) = &heartbeat {
            tracing::info!("off-site repository: heartbeat to {beat:?}");
        }
        Shipper {
            repo,
            settings,
            wal_dir,
            backup_dir,
            logical,
            pg,
            state: Arc::new(Mutex::new(State { file, needs_listing, ..State::default() })),
            view: Arc::new(Mutex::new(view)),
            halted: Arc::default(),
            heartbeat,
            confirmed_since_ping: Arc::default(),
        }
    }

    /// Keeps the plain text of an encrypted manifest or `.history` file
    /// beside `repository.json`: the server cannot decrypt its own objects,
    /// and retention and the window read these back. A copy that cannot be
    /// written only costs that: retention keeps what it cannot read.
    fn keep_plain_copy(&self, name: &str, plain: &[u8]) {
        if let Err(e) = self.repo.keep_plain_copy(name, plain) {
            tracing::warn!("off-site repository: could not keep the plain copy of {name} ({e}); retention keeps what it cannot read");
        }
    }

    /// A confirmed remote write the monitor is told of.
    async fn ping_ok(&self, event: String) {
        if let Some(beat) = &self.heartbeat {
            beat.ok(&event).await;
            self.confirmed_since_ping.store(false, Ordering::Relaxed);
            self.view.lock().unwrap_or_else(|e| e.into_inner()).heartbeat = beat.last().and_then(|l| serde_json::to_value(l).ok());
        }
    }

    /// After a round: WAL uploads healthy (with a write confirmed since the
    /// last success ping) keep the monitor told at least once per interval;
    /// a failed round tells it why.
    async fn ping_after(&self, which: Loop, failed: Option<String>) {
        let Some(beat) = &self.heartbeat else { return };
        if let Some(reason) = failed {
            beat.failed(&reason).await;
        } else {
            // Healthy means both loops: a failing backups loop is not
            // answered by a WAL round's "alive".
            let healthy = which == Loop::Wal && self.state().failing.iter().all(Option::is_none);
            if healthy && self.confirmed_since_ping.load(Ordering::Relaxed) && beat.keepalive().await {
                self.confirmed_since_ping.store(false, Ordering::Relaxed);
            }
        }
        self.view.lock().unwrap_or_else(|e| e.into_inner()).heartbeat = beat.last().and_then(|l| serde_json::to_value(l).ok());
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_confirmed(&self, name: &str) -> bool {
        self.state().file.objects.contains_key(name)
    }

    fn confirm(&self, name: &str, size: u64, sha256: String, put: Put) {
        self.confirmed_since_ping.store(true, Ordering::Relaxed);
        {
            let mut state = self.state();
            state.file.objects.insert(name.to_string(), Confirmed { size, sha256 });
            state.dirty = true;
        }
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.last_upload = Some(SystemTime::now());
        if put == Put::Created {
            view.uploaded_objects += 1;
            view.uploaded_bytes += size;
        }
    }

    /// Whether the local file or directory `path` of the WAL archive is in
    /// the repository (a completed segment, a base backup with its
    /// manifest): pitr's retention may delete only then. Anything else
    /// (outside the archive's stream and base directories) is not ours to hold.
    pub fn confirms(&self, path: &Path) -> bool {
        let Some(wal_dir) = &self.wal_dir else { return true };
        let state = self.state();
        confirmed_path(wal_dir, state.generation.as_deref(), &state.file.objects, path)
    }

    /// Starts both loops on `stage` and shows the shipper on `board`.
    /// Retention is handed [`Shipper::confirms`] from here on.
    pub fn spawn(self, board: &Board, stage: &Stage) {
        board.set_repository(self.view.clone());
        let check = self.clone();
        archive::set_deletion_check(Box::new(move |path| check.confirms(path)));
        tracing::info!("off-site repository {}: shipping WAL every {} ms, base and logical backups as they are made", self.repo.display(), self.settings.wal_interval.as_millis());
        if !self.settings.delete {
            tracing::info!("off-site repository {}: OMNI_REPOSITORY_DELETE=false: nothing is ever deleted there (retention, chunks of whole segments, probe objects); the bucket's lifecycle rules decide", self.repo.display());
        }
        let (wal, backups) = (self.clone(), self);
        let (stop, hurry) = (stage.token(), stage.hurried());
        stage.spawn(async move { wal.run(Loop::Wal, stop, hurry).await });
        let (stop, hurry) = (stage.token(), stage.hurried());
        stage.spawn(async move { backups.run(Loop::Backups, stop, hurry).await });
    }

    async fn run(self, which: Loop, stop: CancellationToken, hurry: CancellationToken) {
        let every = match which {
            Loop::Wal => self.settings.wal_interval,
            Loop::Backups => BACKUPS_EVERY.max(self.settings.wal_interval),
        };
        let mut pg_client: Option<tokio_postgres::Client> = None;
        let mut delay = Duration::ZERO;
        loop {
            // A base backup just kept starts the backups loop at once (its
            // upload, and the status's queue, do not wait for the round).
            let kept = async {
                match which {
                    Loop::Backups => base::KEPT.notified().await,
                    Loop::Wal => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
                () = kept => {}
            }
            let round = async {
                match which {
                    Loop::Wal => self.wal_round(&mut pg_client).await,
                    Loop::Backups => self.backups_round().await,
                }
            };
            // A stop lets the round under way finish (a part of an upload
            // dropped halfway is never an object).
            let outcome = tokio::select! {
                outcome = round => outcome,
                () = hurry.cancelled() => return,
            };
            let failed = match &outcome {
                Err(e) => Some(e.to_string()),
                Ok(()) => None,
            };
            delay = self.after_round(which, outcome, every);
            self.ping_after(which, failed).await;
        }
        // The streamer and PostgreSQL have stopped: their last WAL goes now.
        if which == Loop::Wal && !self.halted.load(Ordering::Relaxed) {
            // PostgreSQL is down: the file's own bytes say where WAL ends.
            let mut no_server = None;
            tokio::select! {
                outcome = self.wal_round(&mut no_server) => {
                    if let Err(e) = &outcome {
                        tracing::warn!("off-site repository: the last WAL upload before the stop failed ({e}); it is uploaded at the next start");
                    }
                }
                () = hurry.cancelled() => {}
            }
        }
        self.save();
    }

    /// Records a round's outcome in the view; returns the wait before the next.
    fn after_round(&self, which: Loop, outcome: Result<(), RepositoryError>, every: Duration) -> Duration {
        self.save();
        let mut delay = every;
        {
            let mut state = self.state();
            match &outcome {
                Ok(()) => {
                    if let Some((n, _)) = state.failing[which as usize].take() {
                        tracing::info!("off-site repository {}: uploads work again (after {n} failed tries)", self.repo.display());
                    }
                }
                Err(RepositoryError::Conflict { .. }) => {
                    if !self.halted.swap(true, Ordering::Relaxed) {
                        tracing::error!("{}", outcome.as_ref().unwrap_err());
                    }
                }
                Err(e) => {
                    let n = state.failing[which as usize].as_ref().map_or(0, |(n, _)| *n) + 1;
                    let text = e.to_string();
                    if n == 1 || n.is_power_of_two() {
                        tracing::warn!("off-site repository: upload failed (try {n}; retried, the service goes on): {text}");
                    }
                    state.failing[which as usize] = Some((n, text));
                    delay = retry_delay(every, n);
                    self.view.lock().unwrap_or_else(|e| e.into_inner()).failures += 1;
                }
            }
        }
        self.refresh_view(delay);
        delay
    }

    /// The view from the state: queue, lag, state, last error.
    fn refresh_view(&self, next: Duration) {
        let state = self.state();
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let pending = state.pending;
        view.queue_depth = pending.iter().map(|p| p.objects).sum();
        view.lag_bytes = pending.iter().map(|p| p.bytes).sum();
        let oldest = pending.iter().filter_map(|p| p.oldest).min();
        view.lag_seconds = oldest.and_then(|t| t.elapsed().ok()).map_or(0.0, |d| d.as_secs_f64());
        let failing = state.failing.iter().flatten().max_by_key(|(n, _)| *n);
        let was_full = view.queue_full();
        if self.halted.load(Ordering::Relaxed) {
            view.state = RepositoryState::Stopped;
            view.next_retry = None;
        } else if let Some((n, text)) = failing {
            view.state = RepositoryState::Retrying;
            view.attempts = *n;
            view.last_error = Some(text.clone());
            view.next_retry = Some(Instant::now() + next);
        } else {
            view.state = RepositoryState::Ok;
            view.attempts = 0;
            view.next_retry = None;
        }
        match (was_full, view.queue_full()) {
            (false, true) => tracing::error!(
                "off-site repository {}: {} MB of WAL and backups wait for upload, more than OMNI_REPOSITORY_QUEUE_MAX_MB={}; nothing local is deleted before its upload, so the disk of OMNI_WAL_DIR fills. Check the repository (GET /gateway/status, repository.last_error)",
                view.url,
                view.lag_bytes / 1_048_576,
                view.queue_max_bytes / 1_048_576
            ),
            (true, false) => tracing::info!("off-site repository {}: the upload queue is back under OMNI_REPOSITORY_QUEUE_MAX_MB", view.url),
            _ => {}
        }
    }

    fn record_conflict(&self, e: &RepositoryError) {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(e.to_string());
    }

    /// Writes the confirmed set when it changed, without the entries whose
    /// local file is gone (see [`local_source_exists`]).
    fn save(&self) {
        let Some(wal_dir) = &self.wal_dir else { return };
        if !self.state().dirty {
            return;
        }
        let stream_dirs = archive::stream_dirs(wal_dir);
        let names: Vec<String> = self.state().file.objects.keys().cloned().collect();
        let gone: Vec<String> = names.into_iter().filter(|name| !local_source_exists(name, wal_dir, &stream_dirs, &self.backup_dir)).collect();
        let text = {
            let mut state = self.state();
            for name in &gone {
                state.file.objects.remove(name);
            }
            state.dirty = false;
            serde_json::to_string(&state.file).expect("the state serializes")
        };
        if let Err(e) = store::write_atomically(&wal_dir.join(STATE_FILE), text.as_bytes()) {
            self.state().dirty = true;
            tracing::warn!("off-site repository: could not record what was uploaded in {} ({e}); a restart lists the repository instead", wal_dir.join(STATE_FILE).display());
        }
    }

    /// Rebuilds the confirmed set from the repository (no state file, or
    /// one of another URL): objects there count as uploaded; a base backup
    /// only with its manifest.
    async fn rebuild(&self, gen: &str) -> Result<(), RepositoryError> {
        let mut found = self.repo.list(&format!("{gen}/")).await?;
        found.extend(self.repo.list("logical/").await?);
        let mut state = self.state();
        for object in &found {
            state.file.objects.entry(object.path.clone()).or_insert(Confirmed { size: object.size, sha256: String::new() });
        }
        state.needs_listing = false;
        state.dirty = true;
        tracing::info!("off-site repository {}: {} objects already there (listed: no record of earlier uploads to this URL)", self.repo.display(), found.len());
        Ok(())
    }

    /// The current generation, from the archive's identity (`None` before the first).
    fn generation(&self) -> Option<String> {
        let wal_dir = self.wal_dir.as_ref()?;
        let identity = Identity::of_archive(wal_dir).ok()??;
        let gen = layout::generation(identity.system_identifier, identity.major);
        let mut state = self.state();
        if state.generation.as_deref() != Some(gen.as_str()) {
            state.generation = Some(gen.clone());
            // Chunk progress belongs to the archive it was read from.
            state.chunks.clear();
        }
        Some(gen)
    }

    async fn prepare_round(&self) -> Result<Option<String>, RepositoryError> {
        if !self.state().conditional_checked {
            let honoured = self.repo.honours_conditional_writes(self.settings.delete).await?;
            let first = !std::mem::replace(&mut self.state().conditional_checked, true);
            if !honoured {
                self.repo.look_first();
                if first {
                    tracing::warn!("off-site repository {}: the store ignores or refuses conditional writes (If-None-Match): each object is looked up before it is written, so an object already there is still never overwritten, but two writers racing for one name could; give each installation its own prefix", self.repo.display());
                }
            }
            self.view.lock().unwrap_or_else(|e| e.into_inner()).conditional_writes = Some(honoured);
        }
        let gen = self.generation();
        let needs = self.state().needs_listing;
        if needs {
            match &gen {
                Some(g) => self.rebuild(g).await?,
                None if self.wal_dir.is_none() => {
                    let found = self.repo.list("logical/").await?;
                    let mut state = self.state();
                    for o in found {
                        state.file.objects.entry(o.path).or_insert(Confirmed { size: o.size, sha256: String::new() });
                    }
                    state.needs_listing = false;
                }
                None => {}
            }
        }
        Ok(gen)
    }

    /// One round of the WAL loop.
    async fn wal_round(&self, pg_client: &mut Option<tokio_postgres::Client>) -> Result<(), RepositoryError> {
        if self.halted.load(Ordering::Relaxed) {
            return Ok(());
        }
        let gen = self.prepare_round().await?;
        let (Some(gen), Some(wal_dir)) = (gen, self.wal_dir.clone()) else { return Ok(()) };
        if self.state().needs_listing {
            return Ok(());
        }
        let mut pending = Pending::default();
        let result = self.ship_wal(&gen, &wal_dir, pg_client, &mut pending).await;
        self.state().pending[Loop::Wal as usize] = pending;
        if let Err(e @ RepositoryError::Conflict { .. }) = &result {
            self.record_conflict(e);
        }
        result
    }

    async fn ship_wal(&self, gen: &str, wal_dir: &Path, pg_client: &mut Option<tokio_postgres::Client>, pending: &mut Pending) -> Result<(), RepositoryError> {
        let dirs = archive::stream_dirs(wal_dir);
        // History files first: a restore needs them to follow timelines.
        for dir in &dirs {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let is_history = file.strip_suffix(".history").is_some_and(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()));
                let name = layout::wal_history(gen, &file);
                if !is_history || self.is_confirmed(&name) {
                    continue;
                }
                let Ok(bytes) = std::fs::read(entry.path()) else { continue };
                self.keep_plain_copy(&name, &bytes);
                let stored = self.repo.put_object(&name, Bytes::from(bytes)).await?;
                self.confirm(&name, stored.size, stored.sha256, stored.put);
            }
        }
        // Completed segments, in WAL order, each once (the first directory
        // that has it, as the restore_command takes it).
        // A segment sealed locally (OMNI_ENCRYPT_LOCAL) goes as it is; its
        // plain file, while it is being sealed, is not read.
        let mut waiting: Vec<archive::Segment> = Vec::new();
        let mut complete: std::collections::HashSet<String> = std::collections::HashSet::new();
        for dir in &dirs {
            let mut segments: Vec<archive::Segment> = archive::segments(dir).into_iter().filter(|s| !s.partial).collect();
            segments.sort_by_key(|s| !s.sealed);
            for seg in segments {
                if complete.insert(seg.name.clone()) && !self.is_confirmed(&layout::wal_segment(gen, &seg.name)) {
                    waiting.push(seg);
                }
            }
        }
        waiting.sort_by(|a, b| (a.position(), &a.name).cmp(&(b.position(), &b.name)));
        for seg in &waiting {
            let modified = std::fs::metadata(&seg.path).and_then(|m| m.modified()).ok();
            pending.add(archive::SEGMENT_BYTES, modified);
        }
        // The segment being written first: it is the recovery point.
        let flush = self.flush_position(pg_client).await;
        for dir in &dirs {
            for seg in archive::segments(dir).into_iter().filter(|s| s.partial && !complete.contains(&s.name)) {
                self.ship_chunk(gen, &seg, if *dir == archive::stream_dir(wal_dir) { flush } else { None }, pending).await?;
            }
        }
        for seg in waiting {
            let name = layout::wal_segment(gen, &seg.name);
            if seg.sealed {
                let stored = match self.repo.put_sealed_file(&name, &seg.path).await {
                    Ok(stored) => stored,
                    Err(RepositoryError::Local { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                self.confirm(&name, stored.size, stored.sha256, stored.put);
                pending.objects = pending.objects.saturating_sub(1);
                pending.bytes = pending.bytes.saturating_sub(archive::SEGMENT_BYTES);
                self.drop_chunks(gen, &seg.name).await;
                continue;
            }
            let path = seg.path.clone();
            let encoded = tokio::task::spawn_blocking(move || std::fs::read(&path).and_then(|b| layout::encode_segment(&b)))
                .await
                .map_err(|e| RepositoryError::Local { path: seg.path.display().to_string(), source: std::io::Error::other(e) });
            let encoded = match encoded? {
                Ok(bytes) => bytes,
                // Deleted meanwhile (never before its upload: retention asks; a restore's move): next round.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(RepositoryError::Local { path: seg.path.display().to_string(), source }),
            };
            let stored = self.repo.put_object(&name, Bytes::from(encoded)).await?;
            self.confirm(&name, stored.size, stored.sha256, stored.put);
            pending.objects = pending.objects.saturating_sub(1);
            pending.bytes = pending.bytes.saturating_sub(archive::SEGMENT_BYTES);
            self.drop_chunks(gen, &seg.name).await;
        }
        if pending.objects == 0 {
            pending.oldest = None;
        }
        Ok(())
    }

    /// The streamer's flush position, asked of PostgreSQL (`None` when it
    /// cannot be asked: the file's own bytes decide then).
    async fn flush_position(&self, client: &mut Option<tokio_postgres::Client>) -> Option<u64> {
        let config = self.pg.as_ref()?;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = crate::pg::connect(config).await.ok();
        }
        let row = client.as_ref()?.query_opt("SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = $1 AND flush_lsn IS NOT NULL ORDER BY flush_lsn DESC LIMIT 1", &[&crate::pitr::APPLICATION_NAME]).await;
        match row {
            Ok(Some(row)) => archive::parse_lsn(row.get::<_, &str>(0)),
            Ok(None) => None,
            Err(_) => {
                *client = None;
                None
            }
        }
    }

    /// Ships the new bytes of a `.partial` segment as one chunk.
    async fn ship_chunk(&self, gen: &str, seg: &archive::Segment, flush: Option<u64>, pending: &mut Pending) -> Result<(), RepositoryError> {
        let Ok(meta) = std::fs::metadata(&seg.path) else { return Ok(()) };
        let modified = meta.modified().ok();
        let known = self.state().chunks.get(&seg.name).copied();
        let shipped = match known {
            Some((at, seen)) if seen == modified && modified.is_some() => {
                // Unchanged since it was read; a flush position past what was shipped is read below.
                let start = archive::segment_lsn(&seg.name).unwrap_or(0);
                if flush.is_none_or(|f| f <= start + at) {
                    return Ok(());
                }
                at
            }
            Some((at, _)) => at,
            None => self.chunks_in_repository(gen, &seg.name).await?,
        };
        let start = archive::segment_lsn(&seg.name).unwrap_or(0);
        let path = seg.path.clone();
        let limit = flush.filter(|f| *f >= start).map(|f| (f - start).min(archive::SEGMENT_BYTES));
        let read = tokio::task::spawn_blocking(move || written_bytes(&path, shipped, limit))
            .await
            .map_err(|e| RepositoryError::Local { path: seg.path.display().to_string(), source: std::io::Error::other(e) })?;
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(RepositoryError::Local { path: seg.path.display().to_string(), source }),
        };
        if bytes.is_empty() {
            self.state().chunks.insert(seg.name.clone(), (shipped, modified));
            return Ok(());
        }
        let to = shipped + bytes.len() as u64;
        pending.add(bytes.len() as u64, modified);
        let name = layout::wal_chunk(gen, &seg.name, shipped, to);
        let size = bytes.len() as u64;
        let put = self.repo.put_object(&name, Bytes::from(bytes)).await?.put;
        pending.objects -= 1;
        pending.bytes -= size;
        if pending.objects == 0 {
            pending.oldest = None;
        }
        // Chunks are not recorded in the state file: listing them is cheap.
        self.state().chunks.insert(seg.name.clone(), (to, modified));
        self.confirmed_since_ping.store(true, Ordering::Relaxed);
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.last_upload = Some(SystemTime::now());
        if put == Put::Created {
            view.uploaded_objects += 1;
            view.uploaded_bytes += size;
        }
        Ok(())
    }

    /// Where the chunks already in the repository end (contiguous from 0).
    async fn chunks_in_repository(&self, gen: &str, segment: &str) -> Result<u64, RepositoryError> {
        let mut ranges: Vec<(u64, u64)> = self
            .repo
            .list(&layout::wal_chunks(gen, segment))
            .await?
            .iter()
            .filter_map(|o| match layout::parse(&o.path) {
                Some(layout::Object::Chunk { from, to, .. }) => Some((from, to)),
                _ => None,
            })
            .collect();
        Ok(contiguous_end(&mut ranges))
    }

    /// The chunks of a segment whose whole object is now confirmed.
    async fn drop_chunks(&self, gen: &str, segment: &str) {
        let had = self.state().chunks.remove(segment).is_some_and(|(at, _)| at > 0);
        if !had || !self.settings.delete {
            return;
        }
        let dropped = async {
            for object in self.repo.list(&layout::wal_chunks(gen, segment)).await? {
                self.repo.delete(&object.path).await?;
            }
            Ok::<(), RepositoryError>(())
        };
        if let Err(e) = dropped.await {
            tracing::info!("off-site repository: the chunks of {segment} stay beside the whole segment ({e})");
        }
    }

    /// One round of the backups loop.
    async fn backups_round(&self) -> Result<(), RepositoryError> {
        // Counted first: a store down since the start still shows what waits.
        self.count_logical_waiting();
        if self.halted.load(Ordering::Relaxed) {
            return Ok(());
        }
        let gen = self.prepare_round().await?;
        if self.state().needs_listing {
            return Ok(());
        }
        let mut pending = Pending::default();
        let mut result = self.ship_backups(gen.as_deref(), &mut pending).await;
        self.state().pending[Loop::Backups as usize] = pending;
        // What was confirmed, even in a round that failed later, is released.
        self.release_logical().await;
        self.count_logical_waiting();
        if let (Ok(()), Some(gen)) = (&result, gen.as_deref()) {
            result = self.retention(gen).await;
        }
        if let Err(e @ RepositoryError::Conflict { .. }) = &result {
            self.record_conflict(e);
        }
        result
    }

    async fn ship_backups(&self, gen: Option<&str>, pending: &mut Pending) -> Result<(), RepositoryError> {
        // What waits, counted before anything goes.
        let bases: Vec<base::BaseBackup> = match (gen, &self.wal_dir) {
            (Some(gen), Some(wal_dir)) => base::list(wal_dir).into_iter().filter(|b| !self.is_confirmed(&layout::base_manifest(gen, &b.id))).collect(),
            _ => Vec::new(),
        };
        let logical: Vec<String> = logical_backups(&self.backup_dir).into_iter().filter(|n| !self.is_confirmed(&layout::logical(&format!("{n}.sha256")))).collect();
        for b in &bases {
            pending.add(b.bytes, Some(b.finished_at.into()));
        }
        for n in &logical {
            let meta = logical_file(&self.backup_dir, n).and_then(|p| std::fs::metadata(p).ok());
            pending.add(meta.as_ref().map_or(0, |m| m.len()), meta.and_then(|m| m.modified().ok()));
        }
        self.state().pending[Loop::Backups as usize] = *pending;
        if let (Some(gen), Some(wal_dir)) = (gen, &self.wal_dir) {
            for b in bases {
                self.ship_base(gen, wal_dir, &b).await?;
                pending.objects -= 1;
                pending.bytes = pending.bytes.saturating_sub(b.bytes);
                self.state().pending[Loop::Backups as usize] = *pending;
                self.save();
            }
        }
        for n in logical {
            let size = logical_file(&self.backup_dir, &n).and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len());
            self.ship_logical(&n).await?;
            pending.objects -= 1;
            pending.bytes = pending.bytes.saturating_sub(size);
            self.state().pending[Loop::Backups as usize] = *pending;
        }
        if pending.objects == 0 {
            pending.oldest = None;
        }
        Ok(())
    }

    /// Logical backups in `OMNI_BACKUP_DIR` whose upload is not confirmed,
    /// for the status: the worker's retention keeps them all.
    fn count_logical_waiting(&self) {
        let waiting = logical_backups(&self.backup_dir).iter().filter(|n| !self.is_confirmed(&layout::logical(&format!("{n}.sha256")))).count() as u64;
        self.view.lock().unwrap_or_else(|e| e.into_inner()).queue_logical_backups = waiting;
    }

    /// Marks each logical backup the repository confirmed (`<name>.uploaded`
    /// beside it, which the worker's retention requires before it deletes
    /// one), then, when a mark is new (or the last try found the directory
    /// busy), runs that retention: what it kept for the upload goes now.
    async fn release_logical(&self) {
        let confirmed: Vec<String> = logical_backups(&self.backup_dir).into_iter().filter(|n| self.is_confirmed(&layout::logical(&format!("{n}.sha256")))).collect();
        let (dir, url, logical) = (self.backup_dir.clone(), self.repo.display(), self.logical.clone());
        let prune_due = std::mem::take(&mut self.state().prune_due);
        let done = tokio::task::spawn_blocking(move || {
            let mut marked = 0;
            let mut failed = None;
            for name in &confirmed {
                match backups::mark_uploaded(&dir, name, &url) {
                    Ok(true) => marked += 1,
                    Ok(false) => {}
                    Err(e) => failed = Some(format!("{name}.uploaded: {e}")),
                }
            }
            let pruned = (marked > 0 || prune_due).then(|| logical.prune());
            (failed, pruned)
        })
        .await;
        let (failed, pruned) = match done {
            Ok(done) => done,
            Err(e) => (Some(e.to_string()), None),
        };
        {
            let mut state = self.state();
            match failed {
                Some(e) if !std::mem::replace(&mut state.mark_failing, true) => tracing::warn!(
                    "off-site repository: could not record in {} that a logical backup is uploaded ({e}); OMNI_BACKUP_KEEP's retention keeps it until this works",
                    self.backup_dir.display()
                ),
                Some(_) => {}
                None => state.mark_failing = false,
            }
        }
        match pruned {
            Some(Err(BackupError::Busy)) => self.state().prune_due = true,
            Some(Err(e)) => tracing::warn!("off-site repository: the retention of logical backups (OMNI_BACKUP_KEEP) could not run after their upload ({e}); the next backup's runs it"),
            Some(Ok(())) | None => {}
        }
    }

    /// Retention in the repository, when due. With `OMNI_REPOSITORY_DELETE=false`
    /// nothing is deleted: what it would delete is only counted for the
    /// status (a store that refuses listing or reading to write-only
    /// credentials leaves the count unknown, and that is no failure).
    async fn retention(&self, gen: &str) -> Result<(), RepositoryError> {
        let due = {
            let state = self.state();
            state.retention_due || state.last_retention.is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
        };
        if !due || self.wal_dir.is_none() {
            return Ok(());
        }
        let ran = |deleted: u64, kept: Option<u64>| {
            let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
            view.retention.last_run = Some(SystemTime::now());
            view.retention.deleted_objects += deleted;
            view.retention.kept_past_window = kept;
        };
        let finished = || {
            let mut state = self.state();
            state.retention_due = false;
            state.last_retention = Some(Instant::now());
        };
        if !self.settings.delete {
            match super::retention::planned(&self.repo, gen, self.settings.window).await {
                Ok(planned) => {
                    self.view.lock().unwrap_or_else(|e| e.into_inner()).retention.unreadable = planned.unreadable.len() as u64;
                    let past = planned.delete;
                    if !past.is_empty() {
                        tracing::info!("off-site retention: {} objects of {} are past OMNI_REPOSITORY_WINDOW ({} s) and kept: OMNI_REPOSITORY_DELETE=false deletes nothing (the bucket's lifecycle rules decide)", past.len(), self.repo.display(), self.settings.window.as_secs());
                    }
                    ran(0, Some(past.len() as u64));
                }
                Err(e) => {
                    tracing::info!("off-site retention: deletion is off (OMNI_REPOSITORY_DELETE=false) and what the window no longer needs could not be counted ({e})");
                    ran(0, None);
                }
            }
            finished();
            return Ok(());
        }
        let planned = super::retention::apply(&self.repo, gen, self.settings.window).await?;
        self.view.lock().unwrap_or_else(|e| e.into_inner()).retention.unreadable = planned.unreadable.len() as u64;
        let deleted = planned.delete.len();
        finished();
        ran(deleted as u64, None);
        if deleted > 0 {
            tracing::info!("off-site retention: deleted {deleted} objects of {} that OMNI_REPOSITORY_WINDOW ({} s) no longer needs", self.repo.display(), self.settings.window.as_secs());
        }
        Ok(())
    }

    /// A base backup: every file, then its manifest.
    async fn ship_base(&self, gen: &str, wal_dir: &Path, backup: &base::BaseBackup) -> Result<(), RepositoryError> {
        let dir = backup.dir(wal_dir);
        let mut files = Vec::new();
        // The keys the files were actually sealed to (a rotation between two
        // files shows as both), not the recipients read again afterwards.
        let mut sealed_to: Vec<String> = Vec::new();
        for (relative, path) in files_under(&dir) {
            // Sealed locally (OMNI_ENCRYPT_LOCAL): `<file>.age` is the object `<file>`, uploaded as it is.
            let sealed = relative.strip_suffix(crate::pitr::sealed::SUFFIX).map(str::to_string);
            let relative = sealed.clone().unwrap_or(relative);
            let name = layout::base_file(gen, &backup.id, &relative);
            let known = self.state().file.objects.get(&name).cloned().filter(|c| !c.sha256.is_empty());
            let (size, sha256) = match known {
                Some(c) => (c.size, c.sha256),
                None => {
                    let upload = match sealed {
                        Some(_) => self.repo.put_sealed_file(&name, &path).await,
                        None => self.repo.put_file(&name, &path).await,
                    };
                    let (put, size, sha) = match upload {
                        Ok(done) => {
                            sealed_to.extend(done.recipients.into_iter().filter(|k| !sealed_to.contains(k)).collect::<Vec<_>>());
                            (done.put, done.size, done.sha256)
                        }
                        // Retention removed it meanwhile (it never does before the manifest is confirmed).
                        Err(RepositoryError::Local { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    self.confirm(&name, size, sha.clone(), put);
                    (size, sha)
                }
            };
            files.push(layout::ManifestFile { name: relative, size, sha256 });
        }
        // Files confirmed in an earlier round (their recipients not recorded): the current ones.
        let recipients = if !sealed_to.is_empty() || !self.repo.encrypts() { sealed_to } else { self.repo.sealer_recipients()? };
        let manifest = layout::BaseManifest { backup: backup.clone(), files, recipients };
        let text = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
        let name = layout::base_manifest(gen, &backup.id);
        self.keep_plain_copy(&name, &text);
        let stored = self.repo.put_object(&name, Bytes::from(text)).await?;
        self.confirm(&name, stored.size, stored.sha256, stored.put);
        self.state().retention_due = true;
        tracing::info!("off-site repository {}: base backup {} uploaded ({} files, {} MB{})", self.repo.display(), backup.id, manifest.files.len(), backup.bytes / 1_000_000, if manifest.recipients.is_empty() { String::new() } else { format!(", encrypted to {}", manifest.recipients.iter().map(|k| super::crypt::short(k)).collect::<Vec<_>>().join(", ")) });
        self.ping_ok(format!("base backup {} in the repository {}", backup.id, self.repo.display())).await;
        Ok(())
    }

    /// A logical backup, then its `.sha256` (the mark that it is whole).
    /// One sealed locally (`OMNI_ENCRYPT_LOCAL`: `<name>.age`) is the object
    /// `logical/<name>` as it is, never encrypted twice.
    async fn ship_logical(&self, name: &str) -> Result<(), RepositoryError> {
        for file in [name.to_string(), format!("{name}.sha256")] {
            let object = layout::logical(&file);
            if self.is_confirmed(&object) {
                continue;
            }
            let path = self.backup_dir.join(&file);
            let sealed = self.backup_dir.join(format!("{file}{}", backups::SEALED_SUFFIX));
            let upload = if !path.is_file() && sealed.is_file() { self.repo.put_sealed_file(&object, &sealed).await } else { self.repo.put_file(&object, &path).await };
            match upload {
                Ok(stored) => {
                    self.confirm(&object, stored.size, stored.sha256, stored.put);
                    if file.ends_with(".sha256") {
                        self.ping_ok(format!("logical backup {name} in the repository {}", self.repo.display())).await;
                    }
                }
                // Deleted by the backups' own retention before it went: nothing to keep.
                Err(RepositoryError::Local { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Where the plain copies of encrypted manifests and `.history` files are
/// kept, in `OMNI_WAL_DIR` beside `repository.json`.
pub const PLAIN_COPIES: &str = "repository-plain";
/// Where a large file is sealed before its upload, in `OMNI_WAL_DIR`.
pub const OUTBOX: &str = "repository-outbox";

/// Sets the process's encryption from the settings, before the repository
/// is opened: objects sealed to `OMNI_ENCRYPT_*`; plain copies and the
/// sealing scratch under `wal_dir` (`None`: no archive; large files are
/// sealed in the system's temporary directory).
pub fn set_crypt(settings: &RepositoryConfig, wal_dir: Option<&Path>) {
    store::set_crypt(store::Crypt {
        encryption: settings.encryption.clone(),
        keys: None,
        plain_copies: wal_dir.map(|d| d.join(PLAIN_COPIES)),
        scratch: wal_dir.map(|d| d.join(OUTBOX)),
    });
}

/// Whether `path` of the archive at `wal_dir` is confirmed in the
/// repository by `objects` (see [`Shipper::confirms`]).
fn confirmed_path(wal_dir: &Path, gen: Option<&str>, objects: &BTreeMap<String, Confirmed>, path: &Path) -> bool {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else { return true };
    let in_base = parent == archive::base_dir(wal_dir);
    let in_stream = parent.parent() == Some(wal_dir) && parent.file_name().and_then(|n| n.to_str()).is_some_and(|d| d == "stream" || d.starts_with("stream-"));
    let segment = archive::Segment::parse(path).filter(|_| in_stream);
    if !in_base && segment.is_none() {
        return true;
    }
    // Not a word from the repository yet: keep it.
    let Some(gen) = gen else { return false };
    match segment {
        Some(seg) if !seg.partial => objects.contains_key(&layout::wal_segment(gen, &seg.name)),
        Some(_) => false,
        None => objects.contains_key(&layout::base_manifest(gen, name)),
    }
}

/// Whether the local file an entry of the confirmed set stands for is
/// still there: a completed segment in one of the archive's stream
/// directories, a base backup in `base/`, a logical backup (or its
/// `.sha256`) in `OMNI_BACKUP_DIR`; history files and names this layout
/// does not write always count as there. The set is only ever asked about
/// local files that exist (what to upload, what retention may delete), so
/// an entry whose file is gone is dead weight, and without dropping it the
/// record grows by a segment's entry for as long as the gateway runs. Should
/// the file come back (a restore's archive), its upload finds the object
/// there and counts as done (the same bytes, or for an encrypted one the
/// same recipients and length), or uploads it again if retention deleted it.
fn local_source_exists(name: &str, wal_dir: &Path, stream_dirs: &[PathBuf], backup_dir: &Path) -> bool {
    match layout::parse(name) {
        Some(layout::Object::Segment { segment, .. }) => {
            stream_dirs.iter().any(|d| d.join(&segment).exists() || d.join(format!("{segment}.partial")).exists() || crate::pitr::archive::sealed_segment(d, &segment).exists())
        }
        Some(layout::Object::BaseFile { id, .. } | layout::Object::BaseManifest { id, .. }) => {
            let base = wal_dir.join("base");
            base.join(&id).exists() || base.join(format!("{id}.json")).exists()
        }
        Some(layout::Object::Logical { .. }) => {
            name.strip_prefix("logical/").is_none_or(|file| backup_dir.join(file).exists() || backup_dir.join(format!("{file}{}", backups::SEALED_SUFFIX)).exists())
        }
        Some(layout::Object::History { .. } | layout::Object::Chunk { .. }) | None => true,
    }
}

/// For a one-shot command beside the running gateway (`omni-gateway backup
/// base`), whose retention must not delete what the gateway's shipper has
/// not uploaded yet: retention asks the shipper's record on disk.
pub fn guard_retention_from_record(config: &crate::config::Config) {
    let Some(location) = RepositoryConfig::parse(config).ok().and_then(|r| r.location) else { return };
    let wal_dir = config.wal.dir.clone();
    let url = location.display();
    let objects = load_state(&wal_dir).filter(|f| f.url == url).map(|f| f.objects).unwrap_or_default();
    let gen = Identity::of_archive(&wal_dir).ok().flatten().map(|i| layout::generation(i.system_identifier, i.major));
    archive::set_deletion_check(Box::new(move |path| confirmed_path(&wal_dir, gen.as_deref(), &objects, path)));
}

/// The wait after `n` failed rounds in a row: the interval doubled per
/// failure, at most [`MAX_RETRY_DELAY`].
pub fn retry_delay(every: Duration, n: u32) -> Duration {
    every.saturating_mul(1u32 << n.min(16)).min(MAX_RETRY_DELAY).max(every)
}

/// Where contiguous ranges from 0 end (ranges in any order; overlaps are
/// the same bytes).
fn contiguous_end(ranges: &mut [(u64, u64)]) -> u64 {
    ranges.sort_unstable();
    let mut end = 0;
    for (from, to) in ranges.iter() {
        if *from > end {
            break;
        }
        end = end.max(*to);
    }
    end
}

/// The bytes of a `.partial` segment from `from` to its written end: `limit`
/// when the flush position is known, else the last non-zero byte (the file
/// is zero-padded by the streamer; this never takes bytes not yet written).
fn written_bytes(path: &Path, from: u64, limit: Option<u64>) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let end = limit.unwrap_or(len).min(len);
    if end <= from {
        return Ok(Vec::new());
    }
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = vec![0u8; (end - from) as usize];
    file.read_exact(&mut bytes)?;
    if limit.is_none() {
        let written = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        bytes.truncate(written);
    }
    Ok(bytes)
}

/// The files of a base backup directory, relative names with `/`, sorted.
fn files_under(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => {
                    if let Ok(rel) = path.strip_prefix(dir) {
                        found.push((rel.to_string_lossy().into_owned(), path));
                    }
                }
                _ => {}
            }
        }
    }
    found.sort();
    found
}

/// A logical backup's file: `<name>`, or sealed (`OMNI_ENCRYPT_LOCAL`) `<name>.age`.
fn logical_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}{}", backups::SEALED_SUFFIX))].into_iter().find(|p| p.is_file())
}

/// Logical backups complete in `OMNI_BACKUP_DIR`: a visible file (or its
/// sealed `<name>.age`) with its `<name>.sha256` beside it (recorded once
/// the dump is whole, or for a sealed one before it is named), oldest first.
fn logical_backups(dir: &Path) -> Vec<String> {
    let mut found: Vec<(SystemTime, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let base = name.strip_suffix(".sha256")?;
            if base.starts_with('.') || base.ends_with(".partial") {
                return None;
            }
            let at = std::fs::metadata(logical_file(dir, base)?).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            Some((at, base.to_string()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, n)| n).collect()
}

fn load_state(wal_dir: &Path) -> Option<StateFile> {
    let bytes = std::fs::read(wal_dir.join(STATE_FILE)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(state) => Some(state),
        Err(e) => {
            tracing::warn!("{} is not readable ({e}); the repository is listed instead", wal_dir.join(STATE_FILE).display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_may_delete_only_what_the_repository_confirmed() {
        let wal = Path::new("/w");
        let gen = "1-pg17";
        let mut objects = BTreeMap::new();
        let confirmed = Confirmed { size: 1, sha256: String::new() };
        objects.insert(layout::wal_segment(gen, "000000010000000000000002"), confirmed.clone());
        objects.insert(layout::base_manifest(gen, "20261205T000000.000Z"), confirmed);
        let may = |p: &str, g: Option<&str>| confirmed_path(wal, g, &objects, Path::new(p));
        assert!(may("/w/stream/000000010000000000000002", Some(gen)));
        assert!(!may("/w/stream/000000010000000000000003", Some(gen)), "not uploaded yet");
        assert!(!may("/w/stream-20261204T000000Z/000000010000000000000003", Some(gen)));
        assert!(!may("/w/stream/000000010000000000000002.partial", Some(gen)), "a partial segment is never whole off-site");
        assert!(may("/w/base/20261205T000000.000Z", Some(gen)));
        assert!(!may("/w/base/20261206T000000.000Z", Some(gen)), "a base backup without its manifest");
        assert!(!may("/w/stream/000000010000000000000002", None), "no generation known: keep");
        assert!(may("/w/generations/x/stream/000000010000000000000002", None), "not the shipper's");
    }

    #[test]
    fn the_record_keeps_only_entries_whose_local_file_is_there() {
        let root = std::env::temp_dir().join(format!("omni-ship-record-{}", std::process::id()));
        let (wal, backups) = (root.join("wal"), root.join("backups"));
        for dir in [wal.join("stream"), wal.join("stream-20261201"), wal.join("base/20261205T000000.000Z"), backups.clone()] {
            std::fs::create_dir_all(dir).unwrap();
        }
        for file in [wal.join("stream/000000010000000000000005"), wal.join("stream-20261201/000000010000000000000003"), wal.join("stream/000000010000000000000006.partial"), backups.join("a.sql"), backups.join("a.sql.sha256")] {
            std::fs::write(file, b"x").unwrap();
        }
        let dirs = archive::stream_dirs(&wal);
        let there = |name: String| local_source_exists(&name, &wal, &dirs, &backups);
        let gen = "1-pg17";
        assert!(there(layout::wal_segment(gen, "000000010000000000000005")));
        assert!(there(layout::wal_segment(gen, "000000010000000000000003")), "in an earlier stream directory");
        assert!(there(layout::wal_segment(gen, "000000010000000000000006")), "still being written");
        assert!(!there(layout::wal_segment(gen, "000000010000000000000002")), "deleted by retention");
        assert!(there(layout::base_file(gen, "20261205T000000.000Z", "base.tar.lz4")));
        assert!(there(layout::base_manifest(gen, "20261205T000000.000Z")));
        assert!(!there(layout::base_manifest(gen, "20261201T000000.000Z")));
        assert!(there(layout::logical("a.sql")) && there(layout::logical("a.sql.sha256")));
        assert!(!there(layout::logical("b.sql")));
        assert!(there(layout::wal_history(gen, "00000002.history")), "history files are kept");
        assert!(there("something/else".into()), "a name this layout does not write is kept");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        let s = Duration::from_secs(1);
        assert_eq!(retry_delay(s, 1), Duration::from_secs(2));
        assert_eq!(retry_delay(s, 3), Duration::from_secs(8));
        assert_eq!(retry_delay(s, 40), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(Duration::from_secs(60), 1), Duration::from_secs(60), "never shorter than the interval");
    }

    #[test]
    fn chunk_progress_is_the_contiguous_run_from_zero() {
        assert_eq!(contiguous_end(&mut []), 0);
        assert_eq!(contiguous_end(&mut [(0x2000, 0x3000), (0, 0x2000)]), 0x3000);
        assert_eq!(contiguous_end(&mut [(0, 0x1000), (0x2000, 0x3000)]), 0x1000, "a gap ends it");
        assert_eq!(contiguous_end(&mut [(0x1000, 0x2000)]), 0, "nothing from 0");
        assert_eq!(contiguous_end(&mut [(0, 0x2000), (0x1000, 0x2800)]), 0x2800, "an overlap holds the same bytes");
    }

    #[test]
    fn the_written_end_of_a_padded_segment_is_its_last_nonzero_byte_unless_the_flush_position_says() {
        let dir = std::env::temp_dir().join(format!("omni-ship-test-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("000000010000000000000001.partial");
        let mut content = vec![0u8; 64 * 1024];
        content[..100].fill(7);
        content[100..104].fill(0);
        std::fs::write(&path, &content).unwrap();
        assert_eq!(written_bytes(&path, 0, None).unwrap().len(), 100);
        assert_eq!(written_bytes(&path, 40, None).unwrap().len(), 60);
        assert_eq!(written_bytes(&path, 0, Some(104)).unwrap().len(), 104, "the flush position covers trailing zeros of a record");
        assert!(written_bytes(&path, 100, None).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
