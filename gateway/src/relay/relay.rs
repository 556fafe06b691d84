//! One run of the relay for one embedded database: connect both sides,
//! copy if needed, then stream until told to stop or something fails.
//!
//! **Decoding.** Changes are read with `pg_logical_slot_peek_binary_changes`
//! over an ordinary connection and decoded here (`pgoutput.rs`); the slot is
//! moved with `pg_replication_slot_advance` only after the target committed.
//!
//! **Exactly once.** Each source transaction is applied whole in one target
//! transaction that also writes its commit LSN into the progress table
//! (`omni_relay_progress`, one row per source database); consecutive small
//! transactions of one peek may share a target transaction, in order, which
//! then records the last one's LSN. A transaction whose commit LSN is at or
//! below the recorded one is skipped. So whatever dies
//! when (gateway, embedded PostgreSQL, target): a transaction is either
//! committed on the target together with its LSN, and skipped when peeked
//! again, or not at all, and the slot still returns it.
//!
//! **Initial copy without a gap or a double.** The slot is created with
//! `pg_create_logical_replication_slot` (no replication connection, so no
//! exported snapshot from it). Then a REPEATABLE READ transaction takes a
//! snapshot S, exports it for `pg_dump --snapshot`, and reads the WAL insert
//! position L_S. Why this is complete and convergent:
//! * Nothing is missed. Slot creation waits for every transaction running
//!   when it began, so every transaction either committed before the slot's
//!   start (and S, taken later, sees it: it is in the copy) or commits after
//!   it (and the slot decodes it). The publication and the DDL capture were
//!   committed before the slot was created, so every DDL whose transaction
//!   is decoded was captured (a transaction that ran DDL before the capture
//!   existed had an xid and was waited for, so it is in the copy).
//! * Nothing is doubled in effect. Transactions decoded by the slot *and*
//!   visible in S all committed before L_S (a commit is in WAL before it
//!   becomes visible); so from L_S on nothing is in the copy. Transactions
//!   at or below L_S are replayed onto S's state in commit order, each
//!   statement idempotent (upsert by key, update and delete by key, DDL that
//!   may already be done skipped): for every row, the last change replayed is
//!   the one S holds, so the state converges to S, then streaming goes on
//!   exactly once. (Tables without a primary key have no key to upsert on;
//!   a change to them committed in that short window can show twice — see
//!   README.)
//!
//! **Keep-alive.** Changes in other databases advance the WAL without
//! producing anything for this slot, and a slot is only confirmed up to a
//! transaction the relay saw. When idle with WAL held, the relay writes a
//! tiny transactional logical message in its own database, which the next
//! peek returns and the slot can be confirmed past.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::apply::{self, literal, Ddl, Relations};
use super::pgoutput::{self, lsn_to_string, parse_lsn, Message};
use super::source::{self, SlotState, ToolTarget, DDL_PREFIX, PUBLICATION, RECOPY_PREFIX};
use crate::status::relay::{DbView, RelayView};
use crate::status::State;

/// Source transactions applied together in one target transaction, up to
/// this much SQL: each stays whole and in order, and the group records the
/// last one's LSN, so exactly-once holds; one round trip and one target
/// commit serve many small transactions.
const GROUP_BYTES: usize = 4 << 20;
/// Changes decoded per peek (whole transactions: the limit is checked at commits).
const PEEK_CHANGES: i32 = 20_000;
/// Peeked changes read from the source at a time, through a cursor: the
/// peek's whole result (one big transaction can be gigabytes) stays on the
/// source's side, in PostgreSQL's own tuplestore, spilled to disk.
const FETCH_ROWS: i64 = 1_000;
/// A source transaction's SQL held before it is sent on: past this, the
/// target transaction is opened and the SQL goes in chunks of this size,
/// the commit (with the progress row) following the last one. With
/// `FETCH_ROWS` and `GROUP_BYTES` this pins the relay's memory per
/// database at a few tens of MB, however big a transaction.
const CHUNK_BYTES: usize = 8 << 20;
/// Consecutive inserts into one table share one statement up to this size.
const MERGED_INSERT_BYTES: usize = 1 << 20;
/// Session settings of the relay's sessions on both sides: the source
/// prints values (pgoutput uses the decoding session's output functions)
/// and the target reads them, and matches rows of tables without a key,
/// under the same settings, whatever the servers' or databases' defaults.
const PINNED_SETTINGS: &str =
    "SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET bytea_output = hex";
/// Between peeks while nothing is pending: bounds the lag when idle.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// An empty peek that took long (every peek decodes again the open
/// transactions since the slot's restart point: a big import in progress)
/// waits this many times its own duration before the next, so re-decoding
/// takes a fifth of the source's time at most.
const SLOW_PEEK_BACKOFF: u32 = 4;
/// The longest wait between peeks.
const MAX_POLL: Duration = Duration::from_secs(5);
/// Idle and holding more than this much WAL: write a keep-alive.
const KEEPALIVE_AFTER_BYTES: i64 = 1 << 20;
/// Between sequence catch-ups (sequences are not decoded).
const SEQUENCE_SYNC_EVERY: Duration = Duration::from_secs(2);
/// PostgreSQL's epoch (2000-01-01) in Unix seconds.
const PG_EPOCH_UNIX: u64 = 946_684_800;

/// One embedded database and where it goes.
pub struct DbRelay {
    pub source_db: String,
    /// The embedded cluster, for the relay's own connections.
    pub source: tokio_postgres::Config,
    pub target: tokio_postgres::Config,
    /// For a database other than the app's: the URL's own database, from
    /// which the target database is created when missing.
    pub create_from: Option<tokio_postgres::Config>,
    /// TLS to the target (`sslmode`, `sslrootcert` of the URL).
    pub tls: Arc<super::tls::TargetTls>,
    /// `pg_dump`/`pg_restore` of the embedded cluster.
    pub bin_dir: PathBuf,
    /// The account they run as (PostgreSQL's).
    pub account: crate::process::privilege::Account,
    /// The relay's picture, and which of its databases this one is.
    pub view: Arc<Mutex<RelayView>>,
    pub index: usize,
    /// `PGSERVE_REPLICATION_MAX_WAL_MB`, in bytes: the most WAL the slot may hold.
    pub max_wal_bytes: i64,
    /// The relay dropped its slot for holding more than that; the next copy says why.
    pub dropped_over_cap: std::sync::atomic::AtomicBool,
}

/// What the target says has been applied for this database.
struct Progress {
    lsn: u64,
    copy_lsn: u64,
    /// The end of the last recorded transaction (or where the slot started,
    /// after a copy): the slot is never confirmed past it. `None` in a row
    /// written before the column existed.
    end: Option<u64>,
}

impl DbRelay {
    fn slot(&self) -> String {
        format!("omni_relay_{}", self.source_db.to_ascii_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
    }

    pub fn set(&self, f: impl FnOnce(&mut DbView)) {
        f(&mut self.view.lock().unwrap_or_else(|e| e.into_inner()).dbs[self.index]);
    }

    /// Runs until `stop` (then `Ok`) or a failure (`Err`, retried by the caller).
    pub async fn run(&self, stop: &CancellationToken, announce_ready: impl Fn()) -> Result<()> {
        let db = &self.source_db;
        let src = crate::pg::connect(&self.source).await.with_context(|| format!("connecting to the embedded database {db}"))?;
        // The WAL held for the target is shown even while the target is
        // unreachable, and the cap is kept then too (each retry passes here).
        if let Ok(held) = slot_lag(&src, &self.slot()).await {
            self.set(|v| {
                v.lag_bytes = held.lag.max(0) as u64;
                if held.lag > 0 {
                    v.lag_seconds = v.last_applied.and_then(|t| t.elapsed().ok()).map_or(v.lag_seconds, |d| d.as_secs_f64());
                }
            });
            let _ = self.keep_cap(&src, held).await?;
        }
        if let Some(admin) = &self.create_from {
            ensure_target_database(admin, &self.tls, self.target.get_dbname().unwrap_or(db)).await?;
        }
        let tgt = super::tls::connect(&self.target, &self.tls).await.context("connecting to the replication target")?;
        let progress_table = prepare_target(&tgt).await?;
        // Every peek starts a decoding session, which PostgreSQL logs at LOG:
        // twenty lines a second in the gateway's log is noise.
        src.batch_execute("SET application_name = 'omni-relay'; SET log_min_messages = warning; SET client_min_messages = warning").await?;
        src.batch_execute(PINNED_SETTINGS).await?;
        source::prepare(&src).await?;

        let slot = self.slot();
        let state = source::slot_state(&src, &slot).await?;
        let mut progress = read_progress(&tgt, &progress_table, db).await?;
        // The target went back in time (restored from a backup, failed
        // over to a standby that lagged): what the slot was confirmed past
        // is no longer on the target, and the slot cannot send it again.
        let mut behind = None;
        if let (SlotState::Usable, Some(p)) = (&state, progress.as_mut()) {
            let confirmed = confirmed_flush(&src, &slot).await?;
            match p.end {
                Some(end) if end < confirmed => behind = Some((end, confirmed)),
                Some(_) => {}
                None => {
                    // Written before the end was recorded: from here on it is.
                    record_end(&tgt, &progress_table, db, confirmed).await?;
                    p.end = Some(confirmed);
                }
            }
        }
        if state != SlotState::Usable || progress.is_none() || behind.is_some() {
            let over_cap = self.dropped_over_cap.load(std::sync::atomic::Ordering::SeqCst);
            let why = match (&state, &progress, behind) {
                _ if over_cap || state == SlotState::Lost => "the replication slot was invalidated (it held more WAL than PGSERVE_REPLICATION_MAX_WAL_MB allows)".to_string(),
                (SlotState::Missing, Some(_), _) => "the replication slot is gone".to_string(),
                (_, None, _) => "the target has no copy of this database yet".to_string(),
                (_, _, Some((end, confirmed))) => format!(
                    "the target went back in time: it records changes applied up to {}, but the replication slot was confirmed up to {} (was the target restored from a backup or failed over?)",
                    lsn_to_string(end),
                    lsn_to_string(confirmed)
                ),
                _ => String::new(),
            };
            tracing::warn!(database = %db, "full copy to the replication target: {why}");
            self.set(|v| {
                v.state = State::Starting;
                v.detail = Some(format!("copying {db}: {why}"));
            });
            progress = Some(self.copy(&src, &tgt, &progress_table, &slot).await?);
            self.dropped_over_cap.store(false, std::sync::atomic::Ordering::SeqCst);
            self.set(|v| v.last_copy = Some(format!("{db}: {why}")));
        }
        let mut progress = progress.expect("read or made above");
        self.refresh_tables(&src).await;
        announce_ready();
        tracing::info!(database = %db, "replication streaming from {} (applied up to {})", slot, lsn_to_string(progress.lsn));

        let mut last_sequences = Instant::now() - SEQUENCE_SYNC_EVERY;
        // Something was applied since the last sequence catch-up: the next
        // one is due even if nothing else arrives (idle after a burst).
        let mut sequences_due = false;
        let mut last_applied_commit: Option<SystemTime> = None;
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let peek_started = Instant::now();
            let batch = self.peek_and_apply(&src, &tgt, &progress_table, &slot, &mut progress).await?;
            let peek_took = peek_started.elapsed();
            if batch.recopy {
                // A logical backup was restored: its transaction is not
                // replayed, the restored database is copied whole instead.
                let why = "a logical backup was restored into it";
                tracing::warn!(database = %db, "full copy to the replication target: {why}");
                self.set(|v| {
                    v.state = State::Starting;
                    v.detail = Some(format!("copying {db}: {why}"));
                });
                progress = self.copy(&src, &tgt, &progress_table, &slot).await?;
                self.set(|v| v.last_copy = Some(format!("{db}: {why}")));
                announce_ready();
                continue;
            }
            if let Some(end) = batch.confirm {
                src.execute(&format!("SELECT pg_replication_slot_advance({}, {})", literal(&slot), literal(&lsn_to_string(end))), &[])
                    .await
                    .context("confirming applied changes to the replication slot")?;
            }
            if let Some(t) = batch.last_commit {
                last_applied_commit = Some(t);
            }
            let held = slot_lag(&src, &slot).await?;
            if self.keep_cap(&src, held).await? {
                bail!("the replication slot held more WAL than PGSERVE_REPLICATION_MAX_WAL_MB allows: dropped, a full copy follows");
            }
            let lag_bytes = held.lag;
            let idle = batch.changes == 0;
            self.set(|v| {
                v.lag_bytes = lag_bytes.max(0) as u64;
                v.applied_transactions += batch.applied;
                if batch.applied > 0 {
                    v.last_applied = Some(SystemTime::now());
                }
                v.lag_seconds = if idle {
                    0.0
                } else {
                    last_applied_commit.and_then(|t| t.elapsed().ok()).map_or(0.0, |d| d.as_secs_f64())
                };
            });
            sequences_due |= batch.applied > 0;
            if sequences_due && last_sequences.elapsed() >= SEQUENCE_SYNC_EVERY {
                sequences_due = false;
                sync_sequences(&src, &tgt).await;
                last_sequences = Instant::now();
                self.refresh_tables(&src).await;
            }
            if idle {
                if lag_bytes > KEEPALIVE_AFTER_BYTES {
                    src.batch_execute(&format!("SELECT pg_logical_emit_message(true, '{}', '')", source::HEARTBEAT_PREFIX)).await?;
                }
                let wait = (peek_took * SLOW_PEEK_BACKOFF).clamp(IDLE_POLL, MAX_POLL);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
            }
        }
    }

    async fn refresh_tables(&self, src: &Client) {
        if let Ok(row) = src.query_one("SELECT count(*) FROM pg_publication_tables WHERE pubname = $1", &[&PUBLICATION]).await {
            let n: i64 = row.get(0);
            self.set(|v| v.tables = n.max(0) as u64);
        }
    }

    /// `PGSERVE_REPLICATION_MAX_WAL_MB` is the relay's own cap, kept here:
    /// PostgreSQL's `max_slot_wal_keep_size` is one setting for every slot,
    /// and the WAL streamer's slot (point-in-time recovery) must not be
    /// invalidated by a smaller one. A slot holding more is dropped, as
    /// PostgreSQL would invalidate it; the next run copies anew. Returns
    /// whether it dropped the slot.
    async fn keep_cap(&self, src: &Client, held: Held) -> Result<bool> {
        if held.held <= self.max_wal_bytes {
            return Ok(false);
        }
        source::drop_slot(src, &self.slot()).await?;
        self.dropped_over_cap.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::warn!(
            database = %self.source_db,
            "the replication slot held {} MB of WAL, more than PGSERVE_REPLICATION_MAX_WAL_MB={} allows: dropped it; a full copy runs once the target takes it",
            held.held >> 20,
            self.max_wal_bytes >> 20
        );
        Ok(true)
    }

    /// The initial copy (see the module docs); returns the progress it recorded.
    async fn copy(&self, src: &Client, tgt: &Client, progress_table: &str, slot: &str) -> Result<Progress> {
        let db = &self.source_db;
        let started = Instant::now();
        // Whatever progress the target recorded belongs to the old slot: it
        // goes first, so a copy that fails midway (leaving the new slot) is
        // copied again by the next run, never streamed from a slot that
        // skipped everything between the two.
        tgt.execute(&format!("DELETE FROM {progress_table} WHERE source_database = $1"), &[db])
            .await
            .context("clearing the old progress on the target")?;
        source::drop_slot(src, slot).await?;
        let slot_start = source::create_slot(src, slot).await?;
        tracing::info!(database = %db, "created replication slot {slot} at {}", lsn_to_string(slot_start));
        // The snapshot must stay open while pg_dump reads through it.
        let snap = crate::pg::connect(&self.source).await.context("opening the copy's snapshot connection")?;
        snap.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let row = snap.query_one("SELECT pg_export_snapshot(), pg_current_wal_insert_lsn()::text", &[]).await?;
        let snapshot: String = row.get(0);
        let copy_lsn = parse_lsn(&row.get::<_, String>(1)).context("the snapshot's LSN")?;
        tracing::info!(database = %db, "copying schema and rows as of snapshot {snapshot} (changes up to {} replayed idempotently)", lsn_to_string(copy_lsn));
        let source_tools = ToolTarget::from_config(&self.source)?;
        let mut target_tools = ToolTarget::from_config(&self.target)?;
        target_tools.tls_env = self.tls.libpq_env();
        source::copy(&self.bin_dir, &source_tools, &snapshot, &target_tools, &source::work_dir(db), &self.account).await?;
        snap.batch_execute("COMMIT").await?;
        sync_sequences(src, tgt).await;
        tgt.execute(
            &format!(
                "INSERT INTO {progress_table} (source_database, lsn, copy_lsn, end_lsn, applied_at) VALUES ($1, '0/0', {}, {}, now())
                 ON CONFLICT (source_database) DO UPDATE SET lsn = EXCLUDED.lsn, copy_lsn = EXCLUDED.copy_lsn, end_lsn = EXCLUDED.end_lsn, applied_at = now()",
                literal(&lsn_to_string(copy_lsn)),
                literal(&lsn_to_string(slot_start))
            ),
            &[db],
        )
        .await
        .context("recording the copy on the target")?;
        self.refresh_tables(src).await;
        tracing::info!(database = %db, "initial copy done in {} ms", started.elapsed().as_millis());
        Ok(Progress { lsn: 0, copy_lsn, end: Some(slot_start) })
    }

    /// Peeks the slot through a cursor and applies what it returns (see
    /// [`Applier`]); returns how far the slot may be confirmed.
    async fn peek_and_apply(&self, src: &Client, tgt: &Client, progress_table: &str, slot: &str, progress: &mut Progress) -> Result<Batch> {
        src.batch_execute(&format!(
            "BEGIN; DECLARE omni_relay_changes NO SCROLL CURSOR FOR SELECT data FROM pg_logical_slot_peek_binary_changes({}, NULL, {PEEK_CHANGES}, 'proto_version', '1', 'publication_names', {}, 'messages', 'true')",
            literal(slot),
            literal(PUBLICATION)
        ))
        .await
        .context("reading changes from the replication slot")?;
        let mut applier = Applier::new(tgt, progress_table, &self.source_db, progress);
        let fetch = format!("FETCH {FETCH_ROWS} FROM omni_relay_changes");
        loop {
            let rows = src.query(&fetch, &[]).await.context("reading changes from the replication slot")?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                applier.handle(pgoutput::decode(row.get(0))?).await?;
                if applier.out.recopy {
                    break;
                }
            }
            if applier.out.recopy {
                break;
            }
        }
        src.batch_execute("COMMIT").await?;
        applier.finish().await
    }
}

/// What to do with a source transaction, known at its BEGIN (its commit LSN).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// At or below the recorded progress: applied already.
    Skip,
    /// Committed before the copy's snapshot LSN: applied alone, each
    /// statement tolerating work the copy did already.
    Window,
    Normal,
}

/// Applies decoded messages as they come: each source transaction whole in
/// one target transaction that also records its LSN (exactly once). Small
/// ones are grouped; a big one is sent in chunks inside its own open target
/// transaction; one carrying DDL is applied alone (a value added by
/// `ALTER TYPE … ADD VALUE` cannot be used in the transaction that added
/// it); transactions with nothing to apply are recorded too, so the slot is
/// never confirmed past what the target records.
struct Applier<'a> {
    tgt: &'a Client,
    progress_table: &'a str,
    db: &'a str,
    progress: &'a mut Progress,
    relations: Relations,
    txn: Option<Txn>,
    pending: Vec<Txn>,
    pending_bytes: usize,
    out: Batch,
}

impl<'a> Applier<'a> {
    fn new(tgt: &'a Client, progress_table: &'a str, db: &'a str, progress: &'a mut Progress) -> Applier<'a> {
        Applier { tgt, progress_table, db, progress, relations: Relations::new(), txn: None, pending: Vec::new(), pending_bytes: 0, out: Batch::default() }
    }

    async fn handle(&mut self, msg: Message) -> Result<()> {
        self.out.changes += 1;
        match msg {
            Message::Begin { final_lsn, commit_time_us, .. } => {
                let mode = if final_lsn <= self.progress.lsn {
                    Mode::Skip
                } else if final_lsn <= self.progress.copy_lsn {
                    Mode::Window
                } else {
                    Mode::Normal
                };
                self.txn = Some(Txn { commit_lsn: final_lsn, end_lsn: 0, commit_time_us, mode, statements: Vec::new(), bytes: 0, after_last_ddl: 0, ddl: false, streamed: false, recopy: false });
            }
            Message::Relation(rel) => {
                self.relations.insert(rel.oid, rel);
            }
            // A logical backup's restore writes this first in its
            // transaction: nothing of it is applied, a full copy follows.
            Message::Logical { prefix, .. } if prefix == RECOPY_PREFIX => {
                let t = self.txn.as_mut().context("a restore's mark outside a transaction")?;
                debug_assert!(!t.streamed, "the mark comes first in its transaction");
                t.recopy = true;
                t.statements.clear();
                t.bytes = 0;
            }
            _ if self.txn.as_ref().is_some_and(|t| t.recopy) && !matches!(msg, Message::Commit { .. }) => {}
            Message::Logical { prefix, content, .. } if prefix == DDL_PREFIX => {
                let ddl: Ddl = serde_json::from_slice(&content).context("a captured DDL message is not the JSON the capture writes")?;
                let t = self.txn.as_mut().context("DDL outside a transaction")?;
                if t.mode == Mode::Skip {
                    return Ok(());
                }
                // A `CREATE TABLE … AS` goes before its rows, unless those
                // were sent already (more than a chunk of them): then it
                // comes after them and the target reports the missing table.
                let at = if ddl.before_rows { t.after_last_ddl } else { t.statements.len() };
                let sql = apply::ddl_sql(&ddl);
                t.bytes += sql.len();
                t.statements.insert(at, Stmt::Sql { sql, ddl: true });
                t.after_last_ddl = at + 1;
                t.ddl = true;
            }
            Message::Commit { commit_lsn, end_lsn, .. } => {
                let mut t = self.txn.take().context("commit without begin")?;
                debug_assert_eq!(t.commit_lsn, commit_lsn);
                t.end_lsn = end_lsn;
                self.out.confirm = Some(end_lsn);
                if t.mode == Mode::Skip {
                    return Ok(());
                }
                if t.recopy {
                    // What came before it is applied; the copy starts after it.
                    self.flush().await?;
                    self.out.recopy = true;
                    return Ok(());
                }
                self.progress.lsn = t.commit_lsn;
                if !t.statements.is_empty() || t.streamed {
                    self.out.last_commit = Some(pg_time(t.commit_time_us));
                }
                if t.streamed {
                    let expected = self.progress.end;
                    self.out.applied += 1;
                    self.progress.end = Some(t.end_lsn);
                    return finish_streamed(self.tgt, self.progress_table, self.db, expected, &t).await;
                }
                if t.mode == Mode::Window || t.ddl {
                    self.flush().await?;
                    self.pending_bytes = t.bytes;
                    self.pending.push(t);
                    return self.flush().await;
                }
                self.pending_bytes += t.bytes;
                self.pending.push(t);
                if self.pending_bytes >= GROUP_BYTES {
                    self.flush().await?;
                }
            }
            other => {
                let mode = self.txn.as_ref().map(|t| t.mode);
                if mode == Some(Mode::Skip) {
                    return Ok(());
                }
                if let Some(change) = apply::change(&self.relations, &other, mode == Some(Mode::Normal)).map_err(anyhow::Error::msg)? {
                    let t = self.txn.as_mut().context("change outside a transaction")?;
                    t.push(change);
                    if t.bytes >= CHUNK_BYTES {
                        self.send_chunk().await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends the open transaction's statements so far, opening its target
    /// transaction first (after the transactions grouped before it).
    async fn send_chunk(&mut self) -> Result<()> {
        if !self.txn.as_ref().is_some_and(|t| t.streamed) {
            self.flush().await?;
        }
        let t = self.txn.as_mut().expect("called inside a transaction");
        if !t.streamed {
            tracing::info!("a large source transaction (committed at {}): applying it in chunks of {} MB", lsn_to_string(t.commit_lsn), CHUNK_BYTES >> 20);
            self.tgt.batch_execute("BEGIN").await?;
            t.streamed = true;
        }
        let result = send_statements(self.tgt, &t.statements, t.mode == Mode::Window).await;
        if let Err(e) = result {
            let _ = self.tgt.batch_execute("ROLLBACK").await;
            return Err(e.context(format!("applying the source transaction committed at {} on the target; retried, nothing after it is applied until it succeeds", lsn_to_string(t.commit_lsn))));
        }
        t.statements.clear();
        t.bytes = 0;
        t.after_last_ddl = 0;
        Ok(())
    }

    /// Applies the grouped transactions and records the last one's end.
    async fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let expected = self.progress.end;
        let last_end = self.pending.last().expect("not empty").end_lsn;
        apply_transactions(self.tgt, self.progress_table, self.db, expected, &self.pending).await?;
        self.progress.end = Some(last_end);
        self.out.applied += self.pending.iter().filter(|t| !t.statements.is_empty()).count() as u64;
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Everything handled is on the target: the slot may be confirmed.
    async fn finish(mut self) -> Result<Batch> {
        if self.txn.is_some() {
            bail!("the peek ended inside a transaction");
        }
        self.flush().await?;
        Ok(self.out)
    }
}

#[derive(Default)]
struct Batch {
    applied: u64,
    /// Messages read: none means idle.
    changes: u64,
    confirm: Option<u64>,
    last_commit: Option<SystemTime>,
    /// A restore's transaction came: a full copy follows (nothing after it is applied).
    recopy: bool,
}

enum Stmt {
    Sql { sql: String, ddl: bool },
    /// Consecutive inserts into one table (see [`apply::Change::Insert`]).
    Insert { head: String, values: String, tail: String },
}

impl Stmt {
    fn write(&self, out: &mut String) {
        match self {
            Stmt::Sql { sql, .. } => out.push_str(sql),
            Stmt::Insert { head, values, tail } => {
                out.push_str(head);
                out.push_str(values);
                out.push_str(tail);
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Stmt::Sql { sql, .. } => sql.len(),
            Stmt::Insert { head, values, tail } => head.len() + values.len() + tail.len(),
        }
    }

    fn ddl(&self) -> bool {
        matches!(self, Stmt::Sql { ddl: true, .. })
    }
}

struct Txn {
    commit_lsn: u64,
    /// Known at its commit.
    end_lsn: u64,
    commit_time_us: i64,
    mode: Mode,
    /// Not sent yet.
    statements: Vec<Stmt>,
    bytes: usize,
    /// Where a DDL that must precede its rows goes: after the previous DDL.
    after_last_ddl: usize,
    /// Carries DDL: applied alone.
    ddl: bool,
    /// Its target transaction is open, with its statements so far.
    streamed: bool,
    /// Marked by a logical backup's restore: skipped, a full copy follows.
    recopy: bool,
}

impl Txn {
    fn push(&mut self, change: apply::Change) {
        match change {
            apply::Change::Insert { head, values, tail } if self.mode == Mode::Normal => {
                if let Some(Stmt::Insert { head: h, values: v, tail: t }) = self.statements.last_mut() {
                    if *h == head && *t == tail && v.len() < MERGED_INSERT_BYTES {
                        v.push_str(", ");
                        v.push_str(&values);
                        self.bytes += values.len() + 2;
                        return;
                    }
                }
                self.bytes += head.len() + values.len() + tail.len();
                self.statements.push(Stmt::Insert { head, values, tail });
            }
            other => {
                let sql = other.into_sql();
                self.bytes += sql.len();
                self.statements.push(Stmt::Sql { sql, ddl: false });
            }
        }
    }
}

fn pg_time(us: i64) -> SystemTime {
    let unix_us = (PG_EPOCH_UNIX as i64).saturating_mul(1_000_000).saturating_add(us).max(0) as u64;
    SystemTime::UNIX_EPOCH + Duration::from_micros(unix_us)
}

/// Records `end` as the progress, on the condition that the target still
/// records `expected`: anything else means the target changed under the
/// relay (restored, failed over, edited), and going on would write into a
/// state the relay knows nothing about. Runs inside the open transaction.
async fn record_progress(tgt: &Client, progress_table: &str, db: &str, expected: Option<u64>, commit_lsn: u64, end: u64) -> Result<()> {
    let sql = format!(
        "UPDATE {progress_table} SET lsn = {}, end_lsn = {}, applied_at = now() WHERE source_database = $1 AND end_lsn IS NOT DISTINCT FROM {}::pg_lsn",
        literal(&lsn_to_string(commit_lsn)),
        literal(&lsn_to_string(end)),
        expected.map_or("NULL".to_string(), |e| literal(&lsn_to_string(e)))
    );
    let n = tgt.execute(&sql, &[&db]).await.context("recording the progress on the target")?;
    if n != 1 {
        bail!(
            "the progress recorded on the replication target for {db} is no longer the one the relay wrote ({}): the target was restored, failed over or edited; the relay starts over and copies anew if the target went back",
            expected.map_or("none".to_string(), lsn_to_string)
        );
    }
    Ok(())
}

/// Sends `statements` inside the open target transaction. `tolerant`
/// (the copy window, see the module docs): each may find its work already
/// done and is tried under a savepoint.
async fn send_statements(tgt: &Client, statements: &[Stmt], tolerant: bool) -> Result<()> {
    if tolerant {
        for s in statements {
            let mut sql = String::with_capacity(s.len());
            s.write(&mut sql);
            tgt.batch_execute("SAVEPOINT omni_relay_step").await?;
            match tgt.batch_execute(&sql).await {
                Ok(()) => tgt.batch_execute("RELEASE SAVEPOINT omni_relay_step").await?,
                Err(e) => {
                    tracing::debug!("already in the copy, skipped: {e}");
                    tgt.batch_execute("ROLLBACK TO SAVEPOINT omni_relay_step; RELEASE SAVEPOINT omni_relay_step").await?;
                }
            }
        }
        return Ok(());
    }
    if statements.is_empty() {
        return Ok(());
    }
    let mut sql = String::with_capacity(statements.iter().map(|s| s.len() + 2).sum());
    for s in statements {
        s.write(&mut sql);
        sql.push_str(";\n");
    }
    tgt.batch_execute(&sql).await?;
    Ok(())
}

/// The rest of a transaction sent in chunks, its progress, its commit.
async fn finish_streamed(tgt: &Client, progress_table: &str, db: &str, expected: Option<u64>, t: &Txn) -> Result<()> {
    let result = async {
        send_statements(tgt, &t.statements, t.mode == Mode::Window).await?;
        record_progress(tgt, progress_table, db, expected, t.commit_lsn, t.end_lsn).await?;
        tgt.batch_execute("COMMIT").await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        let _ = tgt.batch_execute("ROLLBACK").await;
        return Err(e.context(format!("applying the source transaction committed at {} on the target; retried, nothing after it is applied until it succeeds", lsn_to_string(t.commit_lsn))));
    }
    Ok(())
}

/// Source transactions in one target transaction, with the last one's
/// progress. A window transaction or one carrying DDL comes alone.
async fn apply_transactions(tgt: &Client, progress_table: &str, db: &str, expected: Option<u64>, txns: &[Txn]) -> Result<()> {
    let (first, last) = (txns.first().expect("not empty"), txns.last().expect("not empty"));
    let window = txns.len() == 1 && first.mode == Mode::Window;
    let result = async {
        tgt.batch_execute("BEGIN").await?;
        if window {
            send_statements(tgt, &first.statements, true).await?;
        } else {
            let size = txns.iter().flat_map(|t| &t.statements).map(|s| s.len() + 2).sum::<usize>();
            let mut sql = String::with_capacity(size);
            for s in txns.iter().flat_map(|t| &t.statements) {
                s.write(&mut sql);
                sql.push_str(";\n");
            }
            if !sql.is_empty() {
                tgt.batch_execute(&sql).await?;
            }
        }
        record_progress(tgt, progress_table, db, expected, last.commit_lsn, last.end_lsn).await?;
        tgt.batch_execute("COMMIT").await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        let _ = tgt.batch_execute("ROLLBACK").await;
        let which = if txns.iter().flat_map(|t| &t.statements).any(Stmt::ddl) { " (they carry DDL)" } else { "" };
        let range = if txns.len() == 1 {
            format!("the source transaction committed at {}", lsn_to_string(first.commit_lsn))
        } else {
            format!("{} source transactions committed from {} to {}", txns.len(), lsn_to_string(first.commit_lsn), lsn_to_string(last.commit_lsn))
        };
        return Err(e).context(format!("applying {range}{which} on the target; retried, nothing after it is applied until it succeeds"));
    }
    Ok(())
}

/// Creates the database `name` on the target server when it is missing,
/// connected through the URL's database. A role that may not create
/// databases gets an error saying what to do (retried with backoff, so the
/// relay goes on by itself once someone created it).
async fn ensure_target_database(admin: &tokio_postgres::Config, tls: &super::tls::TargetTls, name: &str) -> Result<()> {
    let client = super::tls::connect(admin, tls).await.context("connecting to the replication target")?;
    if client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some() {
        return Ok(());
    }
    match client.batch_execute(&format!("CREATE DATABASE {}", apply::ident(name))).await {
        Ok(()) => {
            tracing::info!(database = %name, "created the database {name} on the replication target");
            Ok(())
        }
        // Another gateway or a person created it meanwhile.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => bail!(
            "the target server has no database {name} and the replication role may not create one: create it there (CREATE DATABASE {}) or grant the role CREATEDB",
            apply::ident(name)
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating the database {name} on the replication target"))),
    }
}

/// The progress table on the target, created when missing; returns its
/// qualified name (in the target role's first schema).
async fn prepare_target(tgt: &Client) -> Result<String> {
    tgt.batch_execute("SET standard_conforming_strings = on; SET application_name = 'omni-relay'; SET client_min_messages = warning").await?;
    tgt.batch_execute(PINNED_SETTINGS).await?;
    let schema: Option<String> = tgt.query_one("SELECT current_schema()", &[]).await?.get(0);
    let Some(schema) = schema else {
        bail!("the target role has no schema to create tables in (its search_path names none that exists); grant it one")
    };
    let table = format!("{}.omni_relay_progress", apply::ident(&schema));
    tgt.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             source_database text PRIMARY KEY,
             lsn pg_lsn NOT NULL,
             copy_lsn pg_lsn NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )"
    ))
    .await
    .with_context(|| format!("creating the progress table {table} on the target (the target role must be allowed to create tables)"))?;
    tgt.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS end_lsn pg_lsn"))
        .await
        .with_context(|| format!("adding the column end_lsn to the progress table {table} on the target"))?;
    Ok(table)
}

async fn read_progress(tgt: &Client, table: &str, db: &str) -> Result<Option<Progress>> {
    let row = tgt.query_opt(&format!("SELECT lsn::text, copy_lsn::text, end_lsn::text FROM {table} WHERE source_database = $1"), &[&db]).await?;
    Ok(row.and_then(|r| {
        Some(Progress {
            lsn: parse_lsn(&r.get::<_, String>(0))?,
            copy_lsn: parse_lsn(&r.get::<_, String>(1))?,
            end: r.get::<_, Option<String>>(2).and_then(|e| parse_lsn(&e)),
        })
    }))
}

async fn record_end(tgt: &Client, table: &str, db: &str, end: u64) -> Result<()> {
    tgt.execute(&format!("UPDATE {table} SET end_lsn = {} WHERE source_database = $1 AND end_lsn IS NULL", literal(&lsn_to_string(end))), &[&db]).await?;
    Ok(())
}

/// How far the slot was confirmed: nothing before it is sent again.
async fn confirmed_flush(src: &Client, slot: &str) -> Result<u64> {
    let row = src.query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
    row.and_then(|r| r.get::<_, Option<String>>(0)).and_then(|l| parse_lsn(&l)).with_context(|| format!("the replication slot {slot} has no confirmed position"))
}

/// The slot's distance from the current WAL position.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// To what the target confirmed: the lag.
    lag: i64,
    /// To the oldest WAL the slot keeps on disk (`restart_lsn`).
    held: i64,
}

async fn slot_lag(src: &Client, slot: &str) -> Result<Held> {
    let row = src
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, (pg_current_wal_lsn() - restart_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    match row {
        Some(r) => Ok(Held { lag: r.get::<_, Option<i64>>(0).unwrap_or(0), held: r.get::<_, Option<i64>>(1).unwrap_or(0) }),
        None => bail!("the replication slot {slot} disappeared"),
    }
}

/// Sequences are not decoded: their values are carried over, forward only,
/// so the target's sequences end at least as far as the source's.
async fn sync_sequences(src: &Client, tgt: &Client) {
    let Ok(rows) = src
        .query(
            "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences
             WHERE last_value IS NOT NULL AND schemaname <> 'omni_relay'",
            &[],
        )
        .await
    else {
        return;
    };
    for r in rows {
        let (name, value): (String, i64) = (r.get(0), r.get(1));
        let sql = format!("SELECT setval({n}, greatest({value}, (SELECT last_value FROM {name})))", n = literal(&name));
        if let Err(e) = tgt.batch_execute(&sql).await {
            tracing::debug!("sequence {name} not carried over: {e}");
        }
    }
}
