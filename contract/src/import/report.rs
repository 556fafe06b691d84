//! What an import did, per table: the JSON the API and the CLI return, the
//! value `GET /api/v1/migration/status` shows as the last import, and the
//! plain-text table the CLI and the log print.

use serde::{Deserialize, Serialize};

/// Rows of one table skipped (or changed) for one reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReasonCount {
    pub reason: String,
    pub rows: u64,
    /// A few of the rows, by key.
    pub examples: Vec<String>,
}

/// One target table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TableReport {
    /// The PostgreSQL table.
    pub table: String,
    /// Its name in the SQLite file (either naming era); null when the file lacks it.
    pub source_table: Option<String>,
    pub rows_in_file: u64,
    /// Rows written by this import.
    pub imported: u64,
    /// Rows whose key was already there with the same content.
    pub already_present: u64,
    /// Rows whose key (or another unique value) was already there with
    /// different content: left as they are.
    pub conflicts: u64,
    pub conflict_examples: Vec<String>,
    /// Rows not imported, by reason (orphans, values PostgreSQL cannot hold).
    pub skipped: Vec<ReasonCount>,
    /// Rows imported with a reference cleared: it named a row that is gone,
    /// and the target's foreign key says ON DELETE SET NULL.
    pub references_cleared: Vec<ReasonCount>,
    /// Columns of the file the target does not have: not imported.
    pub columns_dropped: Vec<String>,
    /// Target columns the file does not have: they took their default.
    pub columns_defaulted: Vec<String>,
}

impl TableReport {
    pub fn skipped_rows(&self) -> u64 {
        self.skipped.iter().map(|s| s.rows).sum()
    }
}

/// One import (or dry run).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImportReport {
    /// The SQLite file read (absolute path; an upload's temporary file).
    pub source: String,
    /// True when nothing was written: the counts say what an import would do.
    pub dry_run: bool,
    /// When the import started (UTC, RFC 3339).
    pub started_at: String,
    pub duration_ms: u64,
    /// Of which checking the file (header, `PRAGMA quick_check`, its tables)
    /// before anything was written.
    #[serde(default)]
    pub checks_ms: u64,
    /// Rows of the file handled per second.
    pub rows_per_second: u64,
    /// The backup taken just before writing (none for a dry run).
    pub safety_backup: Option<String>,
    pub rows_in_file: u64,
    pub imported: u64,
    pub already_present: u64,
    pub conflicts: u64,
    pub skipped: u64,
    /// Parents before children, in import order.
    pub tables: Vec<TableReport>,
}

impl ImportReport {
    /// The report as a plain-text table, for a terminal or the log.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} {}: {} rows in the file, {} imported, {} already present, {} conflicts, {} skipped in {:.1} s (checks {:.1} s; {} rows/s)\n",
            if self.dry_run { "dry run of" } else { "import of" },
            self.source,
            self.rows_in_file,
            self.imported,
            self.already_present,
            self.conflicts,
            self.skipped,
            self.duration_ms as f64 / 1000.0,
            self.checks_ms as f64 / 1000.0,
            self.rows_per_second,
        );
        if let Some(backup) = &self.safety_backup {
            out.push_str(&format!("safety backup taken first: {backup}\n"));
        }
        out.push_str(&format!(
            "{:<28} {:<24} {:>10} {:>10} {:>8} {:>9} {:>8}\n",
            "table", "in the file as", "rows", "imported", "present", "conflicts", "skipped"
        ));
        for t in &self.tables {
            out.push_str(&format!(
                "{:<28} {:<24} {:>10} {:>10} {:>8} {:>9} {:>8}\n",
                t.table,
                t.source_table.as_deref().unwrap_or("(absent)"),
                t.rows_in_file,
                t.imported,
                t.already_present,
                t.conflicts,
                t.skipped_rows()
            ));
        }
        for t in &self.tables {
            let mut notes = Vec::new();
            for s in &t.skipped {
                notes.push(format!("skipped {} ({}), e.g. {}", s.rows, s.reason, s.examples.join(", ")));
            }
            for s in &t.references_cleared {
                notes.push(format!("{} rows: {}, e.g. {}", s.rows, s.reason, s.examples.join(", ")));
            }
            if t.conflicts > 0 {
                notes.push(format!("{} conflicts left as they are, e.g. {}", t.conflicts, t.conflict_examples.join(", ")));
            }
            if !t.columns_dropped.is_empty() {
                notes.push(format!("columns not in Omni's schema, dropped: {}", t.columns_dropped.join(", ")));
            }
            if t.source_table.is_some() && !t.columns_defaulted.is_empty() {
                notes.push(format!("columns missing from the file, defaulted: {}", t.columns_defaulted.join(", ")));
            }
            for note in notes {
                out.push_str(&format!("  {}: {note}\n", t.table));
            }
        }
        out
    }
}

/// Where a running import is, for a progress bar.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    pub dry_run: bool,
    /// The table being imported.
    pub table: String,
    /// 1-based position of that table among `tables_total`.
    pub table_number: usize,
    pub tables_total: usize,
    /// Rows of that table read so far, of `table_rows`.
    pub rows_done: u64,
    pub table_rows: u64,
    /// Rows of every table, so far and in all.
    pub all_rows_done: u64,
    pub all_rows: u64,
}
