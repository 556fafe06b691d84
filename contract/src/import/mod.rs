//! The SQLite importer (SPEC §6, OMNI_SCHEMA.md): an old installation's
//! SQLite file into Omni's PostgreSQL tables, the one code path behind
//! `POST /api/v1/migration/import` (the worker) and `omni-gateway
//! import-sqlite` (the gateway's CLI).
//!
//! Its promises, and where each is kept:
//!
//! * **the source is never changed**: [`source::Source::open`] opens it
//!   read-only (immutable) after checking it is a regular, non-empty SQLite
//!   file that passes `PRAGMA quick_check`;
//! * **the target is never half-written**: everything happens in one
//!   transaction, after a safety backup ([`crate::backups`]); an error, a
//!   cancelled task, a killed worker or a killed PostgreSQL leaves no row of
//!   the import behind. A dry run is the same transaction, rolled back;
//! * **one import at a time**: a transaction advisory lock, tried without
//!   waiting; it also excludes a restore on any worker of the database
//!   ([`crate::leader::OPERATION_KEY`]);
//! * **idempotent**: a row whose key is present is "already present" (same
//!   content) or a "conflict" (different content, left as it is), never
//!   written twice;
//! * **fast and bounded**: rows stream from SQLite into `COPY … (FORMAT
//!   binary)` in chunks over a bounded channel. A table that was empty (with
//!   its parents) is copied straight in, orphans judged against the file; any
//!   other table goes through a staging table and `INSERT … ON CONFLICT DO
//!   NOTHING`, and so does a straight copy that hits a constraint (rolled back
//!   to a savepoint first).

pub mod report;
pub mod schema;
pub mod source;
pub mod values;

use std::{
    path::Path,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::{NoTls, Transaction};

pub use report::{ImportReport, Progress, ReasonCount, TableReport};
use schema::{quote, Default, OnDelete, TABLES};
use source::{Mode, ReadStats, Source, TablePlan, Tally, EXAMPLES};

use crate::backups::{BackupError, Backups};

/// The `omni_settings` key under which the last import's report is kept.
pub const LAST_REPORT_KEY: &str = "sqlite_import";
/// Transaction advisory lock held for the length of an import ("omni" + "imp").
const LOCK_KEY: i64 = 0x006f_6d6e_6969_6d70;

/// What can go wrong, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("there is no file at {0}")]
    NotFound(String),
    #[error("{0} is not a regular file (a directory, a symlink or a device); give the path of the SQLite file itself")]
    NotAFile(String),
    #[error("no SQLite database was found in the usual places; give the path of the file to import")]
    NothingDetected,
    #[error("{0} is empty (0 bytes): there is nothing to import; nothing was written")]
    Empty(String),
    #[error("{0} is not an SQLite database (no \"SQLite format 3\" header); nothing was written")]
    NotSqlite(String),
    #[error("{0}-journal is beside it and not empty: the program that wrote {0} stopped in the middle of a write, and the file alone holds half-written data; nothing was written. Open it once with sqlite3 as a user that may write it (`sqlite3 {0} 'PRAGMA quick_check'`), which rolls the unfinished write back and removes the journal, then import again")]
    HotJournal(String),
    #[error("{path} is a damaged SQLite database ({detail}); nothing was written. Repair a copy with `sqlite3 FILE .recover` and import that")]
    Corrupt { path: String, detail: String },
    #[error("cannot read {path}: {source}; make it readable by the user Omni runs as; nothing was written")]
    Unreadable { path: String, source: std::io::Error },
    #[error("{0} holds none of Omni's tables (instance_configs, users, message_traces, …); nothing was written")]
    NoOmniTables(String),
    #[error("another import is running; retry when it has finished")]
    Busy,
    #[error("the database does not have Omni's tables yet; start the gateway once so the worker applies its migrations, then retry")]
    SchemaMissing,
    #[error("the safety backup before the import failed, so nothing was imported: {0}")]
    Backup(#[from] BackupError),
    #[error("the import failed and was rolled back; nothing was written: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("the import stopped unexpectedly and was rolled back; nothing was written: {0}")]
    Internal(String),
}

/// Told where an import is (see [`Options::progress`]).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How to import.
#[derive(Clone, std::default::Default)]
pub struct Options {
    /// Do everything, then roll back: the report says what an import would do.
    pub dry_run: bool,
    /// Where the safety backup goes before anything is written.
    pub backups: Option<Backups>,
    /// Called as the import moves on (at least once per table and twice a second).
    pub progress: Option<ProgressFn>,
    /// What to call the file in the report, the log and errors, instead of
    /// its path (an upload's temporary file means nothing to its sender).
    pub label: Option<String>,
}

impl ImportError {
    /// The same error with the file called `label` instead of `path`.
    fn relabel(self, path: &str, label: &str) -> ImportError {
        let swap = |text: String| if text == path { label.to_owned() } else { text };
        match self {
            ImportError::NotFound(p) => ImportError::NotFound(swap(p)),
            ImportError::NotAFile(p) => ImportError::NotAFile(swap(p)),
            ImportError::Empty(p) => ImportError::Empty(swap(p)),
            ImportError::NotSqlite(p) => ImportError::NotSqlite(swap(p)),
            ImportError::Corrupt { path: p, detail } => ImportError::Corrupt { path: swap(p), detail },
            ImportError::Unreadable { path: p, source } => ImportError::Unreadable { path: swap(p), source },
            ImportError::NoOmniTables(p) => ImportError::NoOmniTables(swap(p)),
            other => other,
        }
    }
}

/// Checks, without importing, that `path` is a readable, healthy SQLite
/// file holding some of Omni's tables. Blocking.
pub fn check(path: &Path) -> Result<(), ImportError> {
    Source::open(path)?.plan().map(|_| ())
}

/// Imports the SQLite file at `path` into the database at `database_url`.
pub async fn run(path: &Path, database_url: &str, options: Options) -> Result<ImportReport, ImportError> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let now = started_at.duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    let real = path.display().to_string();
    let shown = options.label.clone().unwrap_or_else(|| real.clone());

    let opened = path.to_path_buf();
    let (source, plans, counts) = blocking(move || {
        let source = Source::open(&opened)?;
        let plans = source.plan()?;
        let counts = plans.iter().map(|p| source.count(p)).collect::<Result<Vec<_>, _>>()?;
        Ok((source, plans, counts))
    })
    .await
    .map_err(|e| e.relabel(&real, &shown))?;
    let checks = started.elapsed();
    tracing::info!(source = %shown, dry_run = options.dry_run, rows = counts.iter().sum::<u64>(), "import: the SQLite file passed its checks");

    let (mut client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    // The connection ends by itself once the client is dropped (after the
    // ROLLBACK a dropped transaction sends); an error or a cancelled task
    // thus rolls back, and a killed worker's transaction dies with its socket.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "import: the database connection ended");
        }
    });

    let names: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
    let present: i64 = client
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = ANY($1)", &[&names])
        .await?
        .get(0);
    if present != TABLES.len() as i64 {
        return Err(ImportError::SchemaMissing);
    }

    let tx = client.transaction().await?;
    // Held until commit or rollback, so it is free again the moment this
    // import is over, whichever way it ends.
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1) AND pg_try_advisory_xact_lock($2)", &[&LOCK_KEY, &crate::leader::OPERATION_KEY])
        .await?
        .get(0);
    if !locked {
        return Err(ImportError::Busy);
    }
    let safety_backup = match (&options.backups, options.dry_run) {
        (Some(backups), false) => {
            let created = backups.create_safety().await?;
            tracing::info!(backup = %created.backup_file, "import: safety backup taken");
            Some(created.backup_file)
        }
        _ => None,
    };

    tx.batch_execute(&format!("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", names.join(", "))).await?;
    let mut was_empty = Vec::new();
    for table in &TABLES {
        let row = tx.query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {})", table.name), &[]).await?;
        was_empty.push(row.get::<_, bool>(0));
    }

    let mut importer = TableImporter {
        tx: &tx,
        source: Some(source),
        plans: Arc::new(plans),
        now,
        counts,
        options: &options,
    };
    let mut tables = Vec::new();
    for index in 0..TABLES.len() {
        let parents_empty = TABLES[index].references.iter().all(|r| was_empty[r.parent]);
        let report = importer.table(index, was_empty[index] && parents_empty).await?;
        tables.push(report);
    }

    let sum = |f: fn(&TableReport) -> u64| tables.iter().map(f).sum::<u64>();
    let elapsed = started.elapsed();
    let rows_in_file = sum(|t| t.rows_in_file);
    let report = ImportReport {
        source: shown,
        dry_run: options.dry_run,
        started_at: crate::backups::name::rfc3339(started_at),
        duration_ms: elapsed.as_millis() as u64,
        checks_ms: checks.as_millis() as u64,
        rows_per_second: (rows_in_file as f64 / elapsed.as_secs_f64().max(0.001)) as u64,
        safety_backup,
        rows_in_file,
        imported: sum(|t| t.imported),
        already_present: sum(|t| t.already_present),
        conflicts: sum(|t| t.conflicts),
        skipped: sum(|t| t.skipped_rows()),
        tables,
    };

    if options.dry_run {
        tx.rollback().await?;
    } else {
        // Sequences are not transactional: moved last, just before the
        // commit. A crash in between leaves a gap in the ids, nothing worse.
        for table in TABLES.iter().filter(|t| t.identity) {
            tx.batch_execute(&format!(
                "SELECT setval(s.seq, s.top) FROM (
                     SELECT pg_get_serial_sequence('{name}', '{key}')::regclass AS seq, max({key}) AS top FROM {name}
                 ) s WHERE s.top IS NOT NULL AND s.top > COALESCE(pg_sequence_last_value(s.seq), 0)",
                name = table.name,
                key = table.key
            ))
            .await?;
        }
        let json = serde_json::to_string(&report).map_err(|e| ImportError::Internal(e.to_string()))?;
        tx.execute(
            "INSERT INTO omni_settings (key, value) VALUES ($1, ($2::text)::jsonb)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            &[&LAST_REPORT_KEY, &json],
        )
        .await?;
        tx.commit().await?;
    }
    tracing::info!(
        dry_run = report.dry_run,
        imported = report.imported,
        already_present = report.already_present,
        conflicts = report.conflicts,
        skipped = report.skipped,
        duration_ms = report.duration_ms,
        rows_per_second = report.rows_per_second,
        "import: {}\n{}",
        if report.dry_run { "dry run finished, rolled back" } else { "committed" },
        report.render()
    );
    Ok(report)
}

/// The last committed import's report, if any.
pub async fn last_report(client: &tokio_postgres::Client) -> Result<Option<ImportReport>, tokio_postgres::Error> {
    let row = client.query_opt("SELECT value::text FROM omni_settings WHERE key = $1", &[&LAST_REPORT_KEY]).await?;
    Ok(row.and_then(|row| serde_json::from_str(row.get::<_, &str>(0)).ok()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ImportError> + Send + 'static) -> Result<T, ImportError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ImportError::Internal(format!("the SQLite reader failed: {e}")))?
}

/// The state shared by the tables of one import.
struct TableImporter<'a> {
    tx: &'a Transaction<'a>,
    /// Moved into the blocking reader for each table and back.
    source: Option<Source>,
    plans: Arc<Vec<TablePlan>>,
    /// The import's start, Unix microseconds: `now()` for defaults.
    now: i64,
    /// Rows of each table in the file.
    counts: Vec<u64>,
    options: &'a Options,
}

impl TableImporter<'_> {
    async fn table(&mut self, index: usize, direct: bool) -> Result<TableReport, ImportError> {
        let plan = self.plans[index].clone();
        let table = plan.table();
        let mut report = TableReport {
            table: table.name.to_owned(),
            source_table: plan.source_name.clone(),
            rows_in_file: 0,
            imported: 0,
            already_present: 0,
            conflicts: 0,
            conflict_examples: Vec::new(),
            skipped: Vec::new(),
            references_cleared: Vec::new(),
            columns_dropped: plan.dropped.clone(),
            columns_defaulted: plan.defaulted.iter().map(|c| c.to_string()).collect(),
        };
        if plan.source_name.is_none() {
            return Ok(report);
        }
        if !plan.has(table.key) {
            report.rows_in_file = self.counts[index];
            report.skipped.push(ReasonCount {
                reason: format!("the file's table has no {} column, so its rows cannot be matched or referenced", table.key),
                rows: self.counts[index],
                examples: Vec::new(),
            });
            return Ok(report);
        }
        tracing::info!(table = table.name, rows = self.counts[index], direct, "import: table started");
        let started = Instant::now();
        let columns = plan.columns.iter().map(|(c, _)| quote(c.name)).collect::<Vec<_>>().join(", ");

        if direct {
            self.tx.batch_execute("SAVEPOINT import_direct").await?;
            let copy = format!("COPY {} ({columns}) FROM STDIN (FORMAT binary)", table.name);
            let bulk = self.counts[index] >= BULK_ROWS;
            let result = async {
                let deferred = if bulk { Some(defer_checks(self.tx, table.name).await?) } else { None };
                let stats = self.copy(index, &copy, Mode::Direct).await?;
                if let Some(deferred) = deferred {
                    // One sort per index and one join per reference, instead
                    // of an index insertion and a trigger per row.
                    self.tx.batch_execute(&deferred.join(";\n")).await?;
                }
                Ok::<_, ImportError>(stats)
            }
            .await;
            match result {
                Ok(stats) => {
                    self.tx.batch_execute("RELEASE SAVEPOINT import_direct").await?;
                    report.rows_in_file = stats.rows;
                    report.imported = stats.written;
                    fill_reasons(&mut report, stats);
                    self.finished(&report, started);
                    return Ok(report);
                }
                Err(ImportError::Database(error)) if error.as_db_error().is_some() => {
                    // A constraint the file breaks in a way only PostgreSQL
                    // sees (a duplicate name, a child of a skipped row): the
                    // staging path sorts such rows out one by one.
                    tracing::info!(table = table.name, %error, "import: a straight copy hit a constraint; staging this table instead");
                    self.tx.batch_execute("ROLLBACK TO SAVEPOINT import_direct; RELEASE SAVEPOINT import_direct").await?;
                }
                Err(error) => return Err(error),
            }
        }

        // Staging: no constraints, NULLs kept, so PostgreSQL can judge each row.
        let staging = format!("import_{}", table.name);
        self.tx
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {staging}; CREATE TEMP TABLE {staging} ON COMMIT DROP AS SELECT {columns} FROM {} WITH NO DATA",
                table.name
            ))
            .await?;
        let stats = self.copy(index, &format!("COPY {staging} ({columns}) FROM STDIN (FORMAT binary)"), Mode::Staged).await?;
        report.rows_in_file = stats.rows;
        fill_reasons(&mut report, stats);
        let tx = self.tx;
        settle(tx, &plan, &staging, &mut report).await?;
        self.tx.batch_execute(&format!("DROP TABLE {staging}")).await?;
        self.finished(&report, started);
        Ok(report)
    }

    fn finished(&self, report: &TableReport, started: Instant) {
        tracing::info!(
            table = %report.table,
            rows = report.rows_in_file,
            imported = report.imported,
            already_present = report.already_present,
            conflicts = report.conflicts,
            skipped = report.skipped_rows(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "import: table done"
        );
    }

    /// Streams the file's rows of table `index` into `copy`, returning what the reader saw.
    async fn copy(&mut self, index: usize, copy: &str, mode: Mode) -> Result<ReadStats, ImportError> {
        let sink = self.tx.copy_in::<_, Bytes>(copy).await?;
        let mut sink = std::pin::pin!(sink);
        let (chunks, mut received) = tokio::sync::mpsc::channel::<Bytes>(4);
        let source = self.source.take().expect("the source is back after every table");
        let plans = Arc::clone(&self.plans);
        let (now, table_rows, tables_total) = (self.now, self.counts[index], TABLES.len());
        let rows_before: u64 = self.counts[..index].iter().sum();
        let all_rows: u64 = self.counts.iter().sum();
        let progress = self.options.progress.clone();
        let dry_run = self.options.dry_run;
        let table = TABLES[index].name;
        let report = move |rows_done: u64| {
            if let Some(progress) = &progress {
                progress(&Progress {
                    dry_run,
                    table: table.to_owned(),
                    table_number: index + 1,
                    tables_total,
                    rows_done,
                    table_rows,
                    all_rows_done: rows_before + rows_done,
                    all_rows,
                });
            }
        };
        report(0);
        let reader = tokio::task::spawn_blocking(move || {
            let mut last_log = Instant::now();
            let mut tick = |rows: u64| {
                report(rows);
                if last_log.elapsed().as_secs() >= 5 {
                    tracing::info!(table, rows_done = rows, rows = table_rows, "import: progress");
                    last_log = Instant::now();
                }
            };
            let result = source.stream(&plans[index], &plans, mode, now, &chunks, &mut tick);
            (source, result)
        });
        let mut sent = Ok(());
        while let Some(chunk) = received.recv().await {
            if let Err(error) = sink.send(chunk).await {
                sent = Err(error);
                break;
            }
        }
        // Closing our end stops the reader if the COPY failed.
        drop(received);
        let (source, read) = reader.await.map_err(|e| ImportError::Internal(format!("the SQLite reader failed: {e}")))?;
        self.source = Some(source);
        sent?;
        let stats = read?;
        sink.as_mut().finish().await?;
        Ok(stats)
    }

}

/// Moves rows from the staging table into the target: orphans out,
/// references to missing rows cleared, present keys compared, the rest
/// inserted; every row counted under exactly one heading.
async fn settle(tx: &Transaction<'_>, plan: &TablePlan, staging: &str, report: &mut TableReport) -> Result<(), ImportError> {
    let table = plan.table();
    let key = quote(table.key);
    let examples = |sql: String| async move {
        let rows = tx.query(&sql, &[]).await?;
        Ok::<_, ImportError>(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
    };
    let key_text = |alias: &str, extra: Option<&str>| match extra {
        Some(column) => format!("'{}=' || {alias}.{key}::text || ' ({column}=' || {alias}.{}::text || ')'", table.key, quote(column)),
        None => format!("'{}=' || {alias}.{key}::text", table.key),
    };

    for r in table.references.iter().filter(|r| plan.has(r.column)) {
        let missing = format!(
            "s.{col} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE p.{pcol} = s.{col})",
            col = quote(r.column),
            parent = TABLES[r.parent].name,
            pcol = quote(r.parent_column)
        );
        let named = examples(format!("SELECT {} FROM {staging} s WHERE {missing} LIMIT {EXAMPLES}", key_text("s", Some(r.column)))).await?;
        if named.is_empty() {
            continue;
        }
        let (reason, rows) = match r.on_delete {
            OnDelete::Cascade => {
                (source::orphan_reason(r.column, r.parent), tx.execute(&format!("DELETE FROM {staging} s WHERE {missing}"), &[]).await?)
            }
            OnDelete::SetNull => (
                source::cleared_reason(r.column, r.parent),
                tx.execute(&format!("UPDATE {staging} s SET {} = NULL WHERE {missing}", quote(r.column)), &[]).await?,
            ),
        };
        let list = if r.on_delete == OnDelete::Cascade { &mut report.skipped } else { &mut report.references_cleared };
        list.push(ReasonCount { reason, rows, examples: named });
    }

    // Same content: every imported column equal, where a NULL in a
    // column that takes a default matches whatever the row holds.
    let same = plan
        .columns
        .iter()
        .map(|(c, _)| {
            let name = quote(c.name);
            if c.not_null && c.default != Default::None {
                format!("(s.{name} IS NULL OR s.{name} = o.{name})")
            } else {
                format!("s.{name} IS NOT DISTINCT FROM o.{name}")
            }
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    report.already_present =
        tx.execute(&format!("DELETE FROM {staging} s USING {} o WHERE o.{key} = s.{key} AND {same}", table.name), &[]).await?;
    report.conflict_examples = examples(format!(
        "SELECT {} FROM {staging} s WHERE EXISTS (SELECT 1 FROM {} o WHERE o.{key} = s.{key}) LIMIT {EXAMPLES}",
        key_text("s", None),
        table.name
    ))
    .await?;
    report.conflicts = tx.execute(&format!("DELETE FROM {staging} s USING {} o WHERE o.{key} = s.{key}", table.name), &[]).await?;

    let remaining: i64 = tx.query_one(&format!("SELECT count(*) FROM {staging}"), &[]).await?.get(0);
    let columns = plan.columns.iter().map(|(c, _)| quote(c.name)).collect::<Vec<_>>().join(", ");
    let values = plan
        .columns
        .iter()
        .map(|(c, _)| match (c.not_null, sql_default(c.default)) {
            (true, Some(default)) => format!("COALESCE(s.{}, {default})", quote(c.name)),
            _ => format!("s.{}", quote(c.name)),
        })
        .collect::<Vec<_>>()
        .join(", ");
    report.imported = tx
        .execute(&format!("INSERT INTO {} ({columns}) SELECT {values} FROM {staging} s ON CONFLICT DO NOTHING", table.name), &[])
        .await?;
    // Rows that collided on another unique value (a name taken by a
    // different id) or with each other: conflicts too.
    let collided = remaining as u64 - report.imported;
    if collided > 0 {
        if report.conflict_examples.len() < EXAMPLES {
            let more = examples(format!(
                "SELECT {} FROM {staging} s WHERE NOT EXISTS (SELECT 1 FROM {} o WHERE o.{key} = s.{key}) LIMIT {EXAMPLES}",
                key_text("s", None),
                table.name
            ))
            .await?;
            report.conflict_examples.extend(more.into_iter().take(EXAMPLES - report.conflict_examples.len()));
        }
        report.conflicts += collided;
    }
    Ok(())
}

/// From this many rows on, a table copied straight in gets its plain
/// indexes and foreign keys dropped for the copy and made again after it.
const BULK_ROWS: u64 = 10_000;

/// Drops `table`'s plain (non-unique) indexes and its foreign keys, inside
/// the import's transaction, and returns the statements that make them
/// again exactly as they were (re-adding a foreign key checks every row, so
/// nothing goes unchecked; a failure rolls the savepoint back).
async fn defer_checks(tx: &Transaction<'_>, table: &str) -> Result<Vec<String>, ImportError> {
    let indexes = tx
        .query(
            &format!(
                "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
                 WHERE indrelid = '{table}'::regclass AND NOT indisprimary AND NOT indisunique"
            ),
            &[],
        )
        .await?;
    let references = tx
        .query(&format!("SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '{table}'::regclass AND contype = 'f'"), &[])
        .await?;
    let mut drop = vec!["SET LOCAL maintenance_work_mem = '256MB'".to_owned()];
    let mut remake = Vec::new();
    for row in &indexes {
        drop.push(format!("DROP INDEX {}", row.get::<_, &str>(0)));
        remake.push(row.get::<_, String>(1));
    }
    for row in &references {
        let name = quote(row.get::<_, &str>(0));
        drop.push(format!("ALTER TABLE {table} DROP CONSTRAINT {name}"));
        remake.push(format!("ALTER TABLE {table} ADD CONSTRAINT {name} {}", row.get::<_, &str>(1)));
    }
    tx.batch_execute(&drop.join(";\n")).await?;
    Ok(remake)
}

/// A column default as SQL, for the INSERT from a staging table.
fn sql_default(default: Default) -> Option<String> {
    match default {
        Default::None => None,
        Default::Text(text) => Some(format!("'{}'", text.replace('\'', "''"))),
        Default::Bool(b) => Some(b.to_string()),
        Default::Int(i) => Some(i.to_string()),
        Default::Now => Some("(now() AT TIME ZONE 'utc')".to_owned()),
    }
}

fn fill_reasons(report: &mut TableReport, stats: ReadStats) {
    let list = |map: std::collections::BTreeMap<String, Tally>| {
        map.into_iter().map(|(reason, t)| ReasonCount { reason, rows: t.rows, examples: t.examples }).collect::<Vec<_>>()
    };
    report.skipped.extend(list(stats.skipped));
    report.references_cleared.extend(list(stats.cleared));
}
