//! The old installation's SQLite file, opened so that nothing can change it,
//! and its rows streamed out as binary COPY data.
//!
//! Opening checks, in order: a regular file (not a symlink, `O_NOFOLLOW`),
//! not empty, the `SQLite format 3` header, no hot rollback journal (a
//! non-empty `<file>-journal`: the writer died mid-commit, and since the file
//! is opened read-only, and `immutable` skips the journal check, SQLite would
//! read the half-written pages instead of rolling them back, so such a file is
//! refused with what to do), then SQLite itself opens it
//! read-only (`mode=ro`, and `immutable=1` when no write-ahead log sits beside
//! it, so not even a lock or a `-shm` file is created) and `PRAGMA
//! quick_check` must answer `ok`. The descriptor we checked stays open and its
//! inode is compared with what SQLite opened, so the file checked is the file read.
//!
//! Reading happens on a blocking thread; rows are converted ([`super::values`])
//! into chunks of about [`CHUNK_BYTES`] and handed to the COPY over a bounded
//! channel, so memory stays flat whatever the size of the file.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use rusqlite::{types::ValueRef, Connection, OpenFlags};

use super::{
    schema::{quote, Column, OnDelete, Table, TABLES},
    values::{self, COPY_HEADER, COPY_TRAILER},
    ImportError,
};

/// Size of one chunk of COPY data handed to PostgreSQL.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// How many skipped or conflicting rows a report names per reason.
pub const EXAMPLES: usize = 5;
const HEADER: &[u8; 16] = b"SQLite format 3\0";

/// An opened, checked SQLite file.
pub struct Source {
    pub path: PathBuf,
    connection: Connection,
    /// The descriptor that passed the checks, held so its inode stays the one SQLite reads.
    _file: File,
}

/// How one target table is found in the file.
#[derive(Debug, Clone)]
pub struct TablePlan {
    /// Index into [`TABLES`].
    pub index: usize,
    /// The table's name in the file (either naming era), if it has it.
    pub source_name: Option<String>,
    /// Target columns the file has, in target order, with their name in the file.
    pub columns: Vec<(&'static Column, String)>,
    /// Columns of the file the target lacks: reported and dropped.
    pub dropped: Vec<String>,
    /// Target columns the file lacks: they take the target's default.
    pub defaulted: Vec<&'static str>,
}

impl TablePlan {
    pub fn table(&self) -> &'static Table {
        &TABLES[self.index]
    }

    pub fn has(&self, column: &str) -> bool {
        self.columns.iter().any(|(c, _)| c.name == column)
    }
}

/// Rows skipped (or changed) for one reason.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub rows: u64,
    pub examples: Vec<String>,
}

impl Tally {
    pub fn add(&mut self, example: impl FnOnce() -> String) {
        self.rows += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(example());
        }
    }
}

/// What reading one table found.
#[derive(Debug, Default)]
pub struct ReadStats {
    pub rows: u64,
    pub written: u64,
    /// Rows not written, by reason.
    pub skipped: BTreeMap<String, Tally>,
    /// References cleared (ON DELETE SET NULL to a missing row), by reason.
    pub cleared: BTreeMap<String, Tally>,
}

/// Whether rows whose parent is missing are judged here, against the file
/// (the target table and its parents were empty), or later in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Straight into the target table: orphans are judged against the file,
    /// NULLs in NOT NULL columns take their default here.
    Direct,
    /// Into a staging table: NULLs stay NULL and PostgreSQL judges the rest.
    Staged,
}

impl Source {
    /// Opens and checks `path` (see the module documentation). Blocking.
    pub fn open(path: &Path) -> Result<Source, ImportError> {
        let shown = path.display().to_string();
        let mut file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(|e| {
            match (e.kind(), e.raw_os_error()) {
                (io::ErrorKind::NotFound, _) => ImportError::NotFound(shown.clone()),
                (_, Some(libc::ELOOP)) => ImportError::NotAFile(shown.clone()),
                _ => ImportError::Unreadable { path: shown.clone(), source: e },
            }
        })?;
        let metadata = file.metadata().map_err(|e| ImportError::Unreadable { path: shown.clone(), source: e })?;
        if !metadata.file_type().is_file() {
            return Err(ImportError::NotAFile(shown));
        }
        if metadata.len() == 0 {
            return Err(ImportError::Empty(shown));
        }
        let mut header = [0u8; 16];
        match file.read_exact(&mut header) {
            Ok(()) if &header == HEADER => {}
            Ok(()) => return Err(ImportError::NotSqlite(shown)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ImportError::NotSqlite(shown)),
            Err(e) => return Err(ImportError::Unreadable { path: shown, source: e }),
        }

        refuse_hot_journal(path, &shown)?;

        // A write-ahead log beside the file may hold committed rows: then
        // SQLite must read it (plain read-only); otherwise the file is
        // declared immutable and SQLite touches nothing at all.
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let immutable = std::fs::symlink_metadata(&wal).is_err();
        let uri = format!("file:{}?mode=ro{}", uri_path(path), if immutable { "&immutable=1" } else { "" });
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(&uri, flags).map_err(|e| corrupt(&shown, e))?;
        let opened = std::fs::symlink_metadata(path).map_err(|e| ImportError::Unreadable { path: shown.clone(), source: e })?;
        if (opened.dev(), opened.ino()) != (metadata.dev(), metadata.ino()) {
            return Err(ImportError::Unreadable { path: shown, source: io::Error::other("the file was replaced while it was being opened") });
        }
        let source = Source { path: path.to_path_buf(), connection, _file: file };
        source.quick_check()?;
        Ok(source)
    }

    fn quick_check(&self) -> Result<(), ImportError> {
        let shown = self.path.display().to_string();
        let mut statement = self.connection.prepare("PRAGMA quick_check").map_err(|e| corrupt(&shown, e))?;
        let problems: Vec<String> = statement
            .query_map([], |row| row.get::<_, String>(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| corrupt(&shown, e))?;
        if problems.len() == 1 && problems[0] == "ok" {
            Ok(())
        } else {
            Err(ImportError::Corrupt { path: shown, detail: problems.into_iter().take(3).collect::<Vec<_>>().join("; ") })
        }
    }

    /// Where each target table and column is in this file.
    pub fn plan(&self) -> Result<Vec<TablePlan>, ImportError> {
        let shown = self.path.display().to_string();
        let names: Vec<String> = self
            .connection
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .and_then(|mut s| s.query_map([], |row| row.get::<_, String>(0))?.collect())
            .map_err(|e| corrupt(&shown, e))?;
        let find = |wanted: &str| names.iter().find(|n| n.eq_ignore_ascii_case(wanted)).cloned();
        let mut plans = Vec::new();
        for (index, table) in TABLES.iter().enumerate() {
            // The prefixed era is the newer one: its table wins if a file has both.
            let Some(source_name) = find(table.name).or_else(|| find(table.old_name)) else {
                plans.push(TablePlan { index, source_name: None, columns: Vec::new(), dropped: Vec::new(), defaulted: Vec::new() });
                continue;
            };
            let file_columns: Vec<String> = self
                .connection
                .prepare(&format!("PRAGMA table_info({})", quote(&source_name)))
                .and_then(|mut s| s.query_map([], |row| row.get::<_, String>(1))?.collect())
                .map_err(|e| corrupt(&shown, e))?;
            let columns = table
                .columns
                .iter()
                .filter_map(|c| file_columns.iter().find(|f| f.eq_ignore_ascii_case(c.name)).map(|f| (c, f.clone())))
                .collect();
            let dropped = file_columns.iter().filter(|f| table.column(&f.to_ascii_lowercase()).is_none()).cloned().collect();
            let defaulted = table.columns.iter().filter(|c| !file_columns.iter().any(|f| f.eq_ignore_ascii_case(c.name))).map(|c| c.name).collect();
            plans.push(TablePlan { index, source_name: Some(source_name), columns, dropped, defaulted });
        }
        if plans.iter().all(|p| p.source_name.is_none()) {
            return Err(ImportError::NoOmniTables(shown));
        }
        Ok(plans)
    }

    /// Rows of a table in the file (for progress).
    pub fn count(&self, plan: &TablePlan) -> Result<u64, ImportError> {
        let Some(name) = &plan.source_name else { return Ok(0) };
        self.connection
            .query_row(&format!("SELECT count(*) FROM {}", quote(name)), [], |row| row.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| corrupt(&self.path.display().to_string(), e))
    }

    /// Streams the rows of `plan` as binary COPY data into `out`, in chunks.
    /// `parents` are the plans of every table (for orphan checks in
    /// [`Mode::Direct`]); `now` is the import's start in Unix microseconds;
    /// `progress` is called now and then with the rows read so far.
    /// Stops early, without error, when `out` is closed (the COPY failed).
    pub fn stream(
        &self,
        plan: &TablePlan,
        plans: &[TablePlan],
        mode: Mode,
        now: i64,
        out: &tokio::sync::mpsc::Sender<Bytes>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ReadStats, ImportError> {
        let shown = self.path.display().to_string();
        let mut stats = ReadStats::default();
        let Some(source_name) = &plan.source_name else { return Ok(stats) };
        let table = plan.table();
        let mut select: Vec<String> = plan.columns.iter().map(|(_, name)| format!("t.{}", quote(name))).collect();
        // In Direct mode, one flag per reference: set when the referenced row is missing from the file.
        let references: Vec<_> = if mode == Mode::Direct {
            table.references.iter().filter(|r| plan.has(r.column)).collect()
        } else {
            Vec::new()
        };
        for r in &references {
            let own = quote(&plan.columns.iter().find(|(c, _)| c.name == r.column).expect("checked by has").1);
            let parent = &plans[r.parent];
            let parent_column = parent.columns.iter().find(|(c, _)| c.name == r.parent_column).map(|(_, name)| quote(name));
            select.push(match (&parent.source_name, parent_column) {
                (Some(parent_name), Some(parent_column)) => format!(
                    "(t.{own} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {} p WHERE p.{parent_column} = t.{own}))",
                    quote(parent_name)
                ),
                _ => format!("(t.{own} IS NOT NULL)"),
            });
        }
        let sql = format!("SELECT {} FROM {} t", select.join(", "), quote(source_name));
        let mut statement = self.connection.prepare(&sql).map_err(|e| corrupt(&shown, e))?;
        let mut rows = statement.query([]).map_err(|e| corrupt(&shown, e))?;

        let width = plan.columns.len();
        let key = plan.columns.iter().position(|(c, _)| c.name == table.key);
        let fill_defaults = mode == Mode::Direct;
        let mut buffer: Vec<u8> = Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
        buffer.extend_from_slice(COPY_HEADER);
        let mut cleared = vec![false; width];
        let mut last_report = Instant::now();
        while let Some(row) = rows.next().map_err(|e| corrupt(&shown, e))? {
            stats.rows += 1;
            let describe = |extra: Option<usize>| {
                let mut text = match key {
                    Some(k) => format!("{}={}", table.key, display(row.get_ref(k).ok())),
                    None => format!("row {}", stats.rows),
                };
                if let Some(i) = extra {
                    text.push_str(&format!(" ({}={})", plan.columns[i].0.name, display(row.get_ref(i).ok())));
                }
                text
            };
            cleared.iter_mut().for_each(|c| *c = false);
            let mut orphan = None;
            for (i, r) in references.iter().enumerate() {
                if row.get_ref(width + i).ok().and_then(|v| v.as_i64().ok()).unwrap_or(0) == 0 {
                    continue;
                }
                let column = plan.columns.iter().position(|(c, _)| c.name == r.column).expect("checked by has");
                match r.on_delete {
                    OnDelete::Cascade => {
                        orphan = Some((orphan_reason(r.column, r.parent), column));
                        break;
                    }
                    OnDelete::SetNull => {
                        cleared[column] = true;
                    }
                }
            }
            if let Some((reason, column)) = orphan {
                stats.skipped.entry(reason).or_default().add(|| describe(Some(column)));
                continue;
            }
            let start = buffer.len();
            buffer.extend_from_slice(&(width as i16).to_be_bytes());
            let mut rejected = None;
            for (i, (column, _)) in plan.columns.iter().enumerate() {
                let value = if cleared[i] { ValueRef::Null } else { row.get_ref(i).map_err(|e| corrupt(&shown, e))? };
                if let Err(reason) = values::encode(&mut buffer, column, value, now, fill_defaults) {
                    rejected = Some(reason);
                    break;
                }
            }
            if let Some(reason) = rejected {
                buffer.truncate(start);
                stats.skipped.entry(reason.to_string()).or_default().add(|| describe(None));
                continue;
            }
            for (i, _) in cleared.iter().enumerate().filter(|(_, c)| **c) {
                let r = references.iter().find(|r| r.column == plan.columns[i].0.name).expect("a cleared column has a reference");
                stats.cleared.entry(cleared_reason(r.column, r.parent)).or_default().add(|| describe(Some(i)));
            }
            stats.written += 1;
            if buffer.len() >= CHUNK_BYTES {
                if out.blocking_send(Bytes::from(std::mem::replace(&mut buffer, Vec::with_capacity(CHUNK_BYTES + 64 * 1024)))).is_err() {
                    return Ok(stats);
                }
                if last_report.elapsed() >= Duration::from_millis(500) {
                    progress(stats.rows);
                    last_report = Instant::now();
                }
            }
        }
        buffer.extend_from_slice(COPY_TRAILER);
        let _ = out.blocking_send(Bytes::from(buffer));
        progress(stats.rows);
        Ok(stats)
    }
}

pub fn orphan_reason(column: &str, parent: usize) -> String {
    format!("orphan: its {column} names a row missing from {}", TABLES[parent].name)
}

pub fn cleared_reason(column: &str, parent: usize) -> String {
    format!("{column} cleared (ON DELETE SET NULL): it names a row missing from {}", TABLES[parent].name)
}

/// A value as a report shows it: short, printable.
fn display(value: Option<ValueRef<'_>>) -> String {
    let text = match value {
        None | Some(ValueRef::Null) => "NULL".to_owned(),
        Some(ValueRef::Integer(i)) => i.to_string(),
        Some(ValueRef::Real(r)) => r.to_string(),
        Some(ValueRef::Text(t)) => format!("{:?}", String::from_utf8_lossy(t)),
        Some(ValueRef::Blob(b)) => format!("<{} bytes>", b.len()),
    };
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(80).collect::<String>())
    } else {
        text
    }
}

/// Refuses `path` when `<path>-journal` exists and is not empty: a hot
/// rollback journal. (An empty or zeroed-header journal is what SQLite leaves
/// after a clean commit in `PERSIST`/`TRUNCATE` journal modes; only a journal
/// with a header means an unfinished transaction.)
fn refuse_hot_journal(path: &Path, shown: &str) -> Result<(), ImportError> {
    let mut journal = path.as_os_str().to_owned();
    journal.push("-journal");
    let mut file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&journal) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // A journal we cannot read (or a symlink in its place) cannot be judged: refuse.
        Err(_) => return Err(ImportError::HotJournal(shown.to_owned())),
    };
    let mut header = [0u8; 8];
    let mut read = 0;
    while read < header.len() {
        match file.read(&mut header[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(_) => return Err(ImportError::HotJournal(shown.to_owned())),
        }
    }
    if read == 0 || header.iter().all(|b| *b == 0) {
        Ok(())
    } else {
        Err(ImportError::HotJournal(shown.to_owned()))
    }
}

fn corrupt(path: &str, error: rusqlite::Error) -> ImportError {
    ImportError::Corrupt { path: path.to_owned(), detail: error.to_string() }
}

/// A path as the path part of an SQLite `file:` URI: everything but
/// unreserved characters and `/` percent-encoded.
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_paths_escape_what_a_uri_would_read_as_syntax() {
        assert_eq!(uri_path(Path::new("/srv/omni/data/omni.db")), "/srv/omni/data/omni.db");
        assert_eq!(uri_path(Path::new("/a b/x?mode=rw#1%")), "/a%20b/x%3Fmode%3Drw%231%25");
    }
}
