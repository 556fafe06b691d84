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
use super::source::{self, SlotState, ToolTarget, DDL_PREFIX, PUBLICATION};
use super::status::{DbView, RelayView};
use crate::status::State;

/// Source transactions applied together in one target transaction, up to
/// this much SQL: each stays whole and in order, and the group records the
/// last one's LSN, so exactly-once holds; one round trip and one target
/// commit serve many small transactions.
const GROUP_BYTES: usize = 4 << 20;
/// Changes decoded per peek (whole transactions: the limit is checked at commits).
const PEEK_CHANGES: i32 = 20_000;
/// Between peeks while nothing is pending: bounds the lag when idle.
const IDLE_POLL: Duration = Duration::from_millis(50);
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
        let src = crate::postgres::connect(&self.source).await.with_context(|| format!("connecting to the embedded database {db}"))?;
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
        source::prepare(&src).await?;

        let slot = self.slot();
        let state = source::slot_state(&src, &slot).await?;
        let mut progress = read_progress(&tgt, &progress_table, db).await?;
        if state != SlotState::Usable || progress.is_none() {
            let over_cap = self.dropped_over_cap.load(std::sync::atomic::Ordering::SeqCst);
            let why = match (&state, &progress) {
                _ if over_cap || state == SlotState::Lost => "the replication slot was invalidated (it held more WAL than PGSERVE_REPLICATION_MAX_WAL_MB allows)",
                (SlotState::Missing, Some(_)) => "the replication slot is gone",
                (_, None) => "the target has no copy of this database yet",
                _ => "",
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
            let rows = src
                .query(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, 'proto_version', '1', 'publication_names', $3, 'messages', 'true')",
                    &[&slot, &PEEK_CHANGES, &PUBLICATION],
                )
                .await
                .context("reading changes from the replication slot")?;
            let batch = self.apply_batch(&tgt, &progress_table, &rows, &mut progress).await?;
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
            let idle = rows.is_empty();
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
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_POLL) => {}
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
        let snap = crate::postgres::connect(&self.source).await.context("opening the copy's snapshot connection")?;
        snap.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let row = snap.query_one("SELECT pg_export_snapshot(), pg_current_wal_insert_lsn()::text", &[]).await?;
        let snapshot: String = row.get(0);
        let copy_lsn = parse_lsn(&row.get::<_, String>(1)).context("the snapshot's LSN")?;
        tracing::info!(database = %db, "copying schema and rows as of snapshot {snapshot} (changes up to {} replayed idempotently)", lsn_to_string(copy_lsn));
        let source_tools = ToolTarget::from_config(&self.source)?;
        let mut target_tools = ToolTarget::from_config(&self.target)?;
        target_tools.tls_env = self.tls.libpq_env();
        source::copy(&self.bin_dir, &source_tools, &snapshot, &target_tools, &source::work_dir(db)).await?;
        snap.batch_execute("COMMIT").await?;
        sync_sequences(src, tgt).await;
        tgt.execute(
            &format!(
                "INSERT INTO {progress_table} (source_database, lsn, copy_lsn, applied_at) VALUES ($1, '0/0', {}, now())
                 ON CONFLICT (source_database) DO UPDATE SET lsn = EXCLUDED.lsn, copy_lsn = EXCLUDED.copy_lsn, applied_at = now()",
                literal(&lsn_to_string(copy_lsn))
            ),
            &[db],
        )
        .await
        .context("recording the copy on the target")?;
        self.refresh_tables(src).await;
        tracing::info!(database = %db, "initial copy done in {} ms", started.elapsed().as_millis());
        Ok(Progress { lsn: 0, copy_lsn })
    }

    /// Applies the complete transactions among `rows`, one target
    /// transaction each; returns how far the slot may be confirmed.
    async fn apply_batch(&self, tgt: &Client, progress_table: &str, rows: &[tokio_postgres::Row], progress: &mut Progress) -> Result<Batch> {
        let mut out = Batch::default();
        let mut relations = Relations::new();
        let mut txn: Option<Txn> = None;
        let mut pending: Vec<Txn> = Vec::new();
        let mut pending_bytes = 0;
        for row in rows {
            let data: &[u8] = row.get(0);
            let msg = pgoutput::decode(data)?;
            match msg {
                Message::Begin { final_lsn, commit_time_us, .. } => {
                    txn = Some(Txn { commit_lsn: final_lsn, commit_time_us, statements: Vec::new(), after_last_ddl: 0, window: false });
                }
                Message::Relation(rel) => {
                    relations.insert(rel.oid, rel);
                }
                Message::Logical { prefix, content, .. } if prefix == DDL_PREFIX => {
                    let ddl: Ddl = serde_json::from_slice(&content).context("a captured DDL message is not the JSON the capture writes")?;
                    let t = txn.as_mut().context("DDL outside a transaction")?;
                    let at = if ddl.before_rows { t.after_last_ddl } else { t.statements.len() };
                    t.statements.insert(at, Stmt { sql: apply::ddl_sql(&ddl), ddl: true });
                    t.after_last_ddl = at + 1;
                }
                Message::Commit { commit_lsn, end_lsn, .. } => {
                    let t = txn.take().context("commit without begin")?;
                    debug_assert_eq!(t.commit_lsn, commit_lsn);
                    let mut t = t;
                    if t.commit_lsn > progress.lsn {
                        let window = t.commit_lsn <= progress.copy_lsn;
                        t.window = window;
                        progress.lsn = t.commit_lsn;
                        if !t.statements.is_empty() {
                            out.last_commit = Some(pg_time(t.commit_time_us));
                            if window {
                                out.applied += flush(tgt, progress_table, &self.source_db, &mut pending).await?;
                                out.applied += flush(tgt, progress_table, &self.source_db, &mut vec![t]).await?;
                            } else {
                                pending_bytes += t.statements.iter().map(|s| s.sql.len()).sum::<usize>();
                                pending.push(t);
                                if pending_bytes >= GROUP_BYTES {
                                    out.applied += flush(tgt, progress_table, &self.source_db, &mut pending).await?;
                                    pending_bytes = 0;
                                }
                            }
                        }
                    }
                    out.confirm = Some(end_lsn);
                }
                other => {
                    if let Some(sql) = apply::change_sql(&relations, &other).map_err(anyhow::Error::msg)? {
                        txn.as_mut().context("change outside a transaction")?.statements.push(Stmt { sql, ddl: false });
                    }
                }
            }
        }
        // The slot is confirmed only after this returns: everything is on the target.
        out.applied += flush(tgt, progress_table, &self.source_db, &mut pending).await?;
        Ok(out)
    }
}

/// Applies `txns` (complete source transactions, in commit order) and
/// empties it; returns how many were applied.
async fn flush(tgt: &Client, progress_table: &str, db: &str, txns: &mut Vec<Txn>) -> Result<u64> {
    if txns.is_empty() {
        return Ok(0);
    }
    let window = txns.len() == 1 && txns[0].window;
    apply_transactions(tgt, progress_table, db, txns, window).await?;
    let n = txns.len() as u64;
    txns.clear();
    Ok(n)
}

#[derive(Default)]
struct Batch {
    applied: u64,
    confirm: Option<u64>,
    last_commit: Option<SystemTime>,
}

struct Stmt {
    sql: String,
    ddl: bool,
}

struct Txn {
    commit_lsn: u64,
    commit_time_us: i64,
    statements: Vec<Stmt>,
    /// Where a DDL that must precede its rows goes: after the previous DDL.
    after_last_ddl: usize,
    /// Committed before the copy's snapshot LSN: applied alone, tolerantly.
    window: bool,
}

fn pg_time(us: i64) -> SystemTime {
    let unix_us = (PG_EPOCH_UNIX as i64).saturating_mul(1_000_000).saturating_add(us).max(0) as u64;
    SystemTime::UNIX_EPOCH + Duration::from_micros(unix_us)
}

/// Source transactions in one target transaction, with the last one's LSN.
/// Inside the copy window (then alone) each statement may find its work
/// already done (see the module docs) and is tried under a savepoint.
async fn apply_transactions(tgt: &Client, progress_table: &str, db: &str, txns: &[Txn], window: bool) -> Result<()> {
    let (first, last) = (txns.first().expect("not empty"), txns.last().expect("not empty"));
    let record = format!(
        "INSERT INTO {progress_table} (source_database, lsn, copy_lsn, applied_at) VALUES ({}, {lsn}, {lsn}, now())
         ON CONFLICT (source_database) DO UPDATE SET lsn = EXCLUDED.lsn, applied_at = EXCLUDED.applied_at",
        literal(db),
        lsn = literal(&lsn_to_string(last.commit_lsn))
    );
    let result = if window {
        apply_tolerant(tgt, &first.statements, &record).await
    } else {
        let size = txns.iter().flat_map(|t| &t.statements).map(|s| s.sql.len() + 2).sum::<usize>();
        let mut sql = String::with_capacity(size + record.len() + 16);
        sql.push_str("BEGIN;\n");
        for s in txns.iter().flat_map(|t| &t.statements) {
            sql.push_str(&s.sql);
            sql.push_str(";\n");
        }
        sql.push_str(&record);
        sql.push_str(";\nCOMMIT");
        tgt.batch_execute(&sql).await.map_err(anyhow::Error::from)
    };
    if let Err(e) = result {
        let _ = tgt.batch_execute("ROLLBACK").await;
        let which = if txns.iter().flat_map(|t| &t.statements).any(|s| s.ddl) { " (they carry DDL)" } else { "" };
        let range = if txns.len() == 1 {
            format!("the source transaction committed at {}", lsn_to_string(first.commit_lsn))
        } else {
            format!("{} source transactions committed from {} to {}", txns.len(), lsn_to_string(first.commit_lsn), lsn_to_string(last.commit_lsn))
        };
        return Err(e).context(format!("applying {range}{which} on the target; retried, nothing after it is applied until it succeeds"));
    }
    Ok(())
}

async fn apply_tolerant(tgt: &Client, statements: &[Stmt], record: &str) -> Result<()> {
    tgt.batch_execute("BEGIN").await?;
    for s in statements {
        tgt.batch_execute("SAVEPOINT omni_relay_step").await?;
        match tgt.batch_execute(&s.sql).await {
            Ok(()) => tgt.batch_execute("RELEASE SAVEPOINT omni_relay_step").await?,
            Err(e) => {
                tracing::debug!("already in the copy, skipped: {e}");
                tgt.batch_execute("ROLLBACK TO SAVEPOINT omni_relay_step; RELEASE SAVEPOINT omni_relay_step").await?;
            }
        }
    }
    tgt.batch_execute(record).await?;
    tgt.batch_execute("COMMIT").await?;
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
    Ok(table)
}

async fn read_progress(tgt: &Client, table: &str, db: &str) -> Result<Option<Progress>> {
    let row = tgt.query_opt(&format!("SELECT lsn::text, copy_lsn::text FROM {table} WHERE source_database = $1"), &[&db]).await?;
    Ok(row.and_then(|r| Some(Progress { lsn: parse_lsn(&r.get::<_, String>(0))?, copy_lsn: parse_lsn(&r.get::<_, String>(1))? })))
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
