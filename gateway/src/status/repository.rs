//! What the off-site repository's shipper shows: the `repository` entry of
//! `/gateway/status` (and `/health`), the `omni_repository_*` metrics. Plain
//! data filled by `repository/ship.rs`; like the relay, it is not among the
//! supervised children: a failing repository degrades, it never makes
//! `/health` answer 503. Beside it, the last drill of the off-site copy
//! ([`Verified`], `repository/drill.rs`): `last_verified` in the status.

use std::fmt::Write;
use std::time::{Instant, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The last drill of the off-site copy, as `OMNI_WAL_DIR/drill-offsite.json`
/// records it and `last_verified` in the status shows it: what was
/// downloaded from the repository, checked against its manifest and, with
/// the key, decrypted and restored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verified {
    pub at: DateTime<Utc>,
    /// Every check it made passed (with `manifest_only`: only those).
    pub ok: bool,
    /// The base backup of the repository it drilled (`None`: it found none,
    /// or could not read the repository).
    pub base_backup: Option<String>,
    /// No `OMNI_DECRYPT_IDENTITY_FILE` for an encrypted repository: the
    /// stored objects were checked against their manifest, nothing was
    /// decrypted or restored (`summary` says so).
    pub manifest_only: bool,
    /// The object (path in the repository) whose bytes are not the ones
    /// its manifest names, or that is missing or will not decrypt.
    pub damaged_object: Option<String>,
    /// Why it failed, with what to do.
    pub error: Option<String>,
    /// What was checked, in one sentence for people.
    pub summary: String,
    /// Tables of the app database in the restored copy (a full drill).
    pub app_tables: Option<i64>,
    pub objects: u64,
    pub bytes: u64,
    pub took_ms: u64,
    /// When a drill last passed (this one or an earlier one).
    pub last_success: Option<DateTime<Utc>>,
}

impl Verified {
    /// Why a failed drill degrades the service (`None`: it passed).
    pub fn degraded(&self) -> Option<String> {
        (!self.ok).then(|| format!("the last drill of the off-site copy failed: {}", self.error.as_deref().unwrap_or("see the log")))
    }

    /// The `omni_repository_drill_*` lines of `/metrics`.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: String| metric(&mut out, name, "gauge", help, value);
        gauge("omni_repository_drill_ok", "1 when the last drill of the off-site copy passed (downloaded, checked against its manifest, restored when a key is set).", u8::from(self.ok).to_string());
        gauge("omni_repository_drill_manifest_only", "1 when the last off-site drill only checked objects against their manifest (encrypted, no OMNI_DECRYPT_IDENTITY_FILE).", u8::from(self.manifest_only).to_string());
        gauge("omni_repository_drill_last_run_timestamp_seconds", "When the last drill of the off-site copy ended (Unix time).", unix(self.at));
        if let Some(at) = self.last_success {
            gauge("omni_repository_drill_last_success_timestamp_seconds", "When a drill of the off-site copy last passed (Unix time).", unix(at));
        }
        out
    }
}

/// The last off-site drill of this process (or, after a restart, the one
/// its record holds). One per process, set apart from the view: the drill
/// runs among the cluster's jobs, the view belongs to the shipper, and
/// neither waits for the other to start.
static LAST_VERIFIED: std::sync::RwLock<Option<Verified>> = std::sync::RwLock::new(None);

/// Shows `verified` as the last off-site drill.
pub fn set_last_verified(verified: Verified) {
    *LAST_VERIFIED.write().unwrap_or_else(|e| e.into_inner()) = Some(verified);
}

/// The last off-site drill, if one ran.
pub fn last_verified() -> Option<Verified> {
    LAST_VERIFIED.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Where the shipper stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepositoryState {
    /// Its first round has not ended yet.
    Starting,
    /// The last round uploaded everything that was complete locally.
    Ok,
    /// The last round failed; the next try is at `next_retry`.
    Retrying,
    /// An object in the repository holds other bytes than ours: uploads
    /// are stopped until an operator looks (see `last_error`).
    Stopped,
}

impl RepositoryState {
    pub fn as_str(self) -> &'static str {
        match self {
            RepositoryState::Starting => "starting",
            RepositoryState::Ok => "ok",
            RepositoryState::Retrying => "retrying",
            RepositoryState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RepositoryView {
    /// The repository's URL (it holds no secret).
    pub url: String,
    pub state: RepositoryState,
    /// When an upload was last confirmed.
    pub last_upload: Option<SystemTime>,
    /// Age of the oldest local WAL or backup not yet confirmed (0 when none).
    pub lag_seconds: f64,
    /// Bytes complete locally and not yet confirmed (the queue).
    pub lag_bytes: u64,
    /// Objects waiting to be uploaded.
    pub queue_depth: u64,
    /// Logical backups of `OMNI_BACKUP_DIR` whose upload is not confirmed:
    /// `OMNI_BACKUP_KEEP`'s retention keeps each of them until it is.
    pub queue_logical_backups: u64,
    /// `OMNI_REPOSITORY_QUEUE_MAX_MB`, in bytes.
    pub queue_max_bytes: u64,
    pub uploaded_objects: u64,
    pub uploaded_bytes: u64,
    /// Failed rounds since the start.
    pub failures: u64,
    /// Failed rounds in a row (the exponent of the retry delay).
    pub attempts: u32,
    pub next_retry: Option<Instant>,
    /// The last error, redacted, with what to do.
    pub last_error: Option<String>,
    /// Retention in the repository: its settings and what it did.
    pub retention: RetentionView,
    /// Whether the store honours conditional writes (`None` until asked);
    /// false: every write looks for the object first.
    pub conditional_writes: Option<bool>,
    /// `off`, or what objects are encrypted to (`age, to age1…`).
    pub encryption: String,
    /// Said once at the start and kept here (a public cloud without
    /// encryption); the Backups page shows them.
    pub warnings: Vec<String>,
    /// The heartbeat's last ping (`OMNI_BACKUP_HEARTBEAT_URL`), when one is set.
    pub heartbeat: Option<serde_json::Value>,
}

/// Retention in the repository, as the status shows it.
#[derive(Debug, Clone, Default)]
pub struct RetentionView {
    /// `OMNI_REPOSITORY_DELETE`: false deletes nothing there, ever.
    pub delete: bool,
    /// `OMNI_REPOSITORY_WINDOW`.
    pub window_s: u64,
    /// When it last looked at the repository.
    pub last_run: Option<SystemTime>,
    /// Objects it deleted since the start.
    pub deleted_objects: u64,
    /// With deletion off: objects the window no longer needs, kept (as of
    /// the last look; `None` before one, or when the store refused the listing).
    pub kept_past_window: Option<u64>,
    /// Manifests and `.history` files it could not read at its last run
    /// (encrypted, no plain copy here): their backups and all WAL are kept.
    pub unreadable: u64,
}

impl RepositoryView {
    pub fn new(url: String, queue_max_bytes: u64, delete: bool, window_s: u64) -> Self {
        RepositoryView {
            url,
            state: RepositoryState::Starting,
            last_upload: None,
            lag_seconds: 0.0,
            lag_bytes: 0,
            queue_depth: 0,
            queue_logical_backups: 0,
            queue_max_bytes,
            uploaded_objects: 0,
            uploaded_bytes: 0,
            failures: 0,
            attempts: 0,
            next_retry: None,
            last_error: None,
            retention: RetentionView { delete, window_s, ..RetentionView::default() },
            conditional_writes: None,
            encryption: "off".into(),
            warnings: Vec::new(),
            heartbeat: None,
        }
    }

    /// Past `OMNI_REPOSITORY_QUEUE_MAX_MB`.
    pub fn queue_full(&self) -> bool {
        self.lag_bytes > self.queue_max_bytes
    }

    /// Why the off-site copy is behind, for `/health`'s `degraded` list.
    pub fn degraded(&self) -> Option<String> {
        let mut why = Vec::new();
        match self.state {
            RepositoryState::Retrying => why.push(format!("uploads are failing ({})", self.last_error.as_deref().unwrap_or("see the log"))),
            RepositoryState::Stopped => why.push(format!("uploads are stopped: {}", self.last_error.as_deref().unwrap_or("see the log"))),
            _ => {}
        }
        why.extend(last_verified().as_ref().and_then(Verified::degraded));
        if self.queue_full() {
            why.push(format!("{} MB wait for upload, over OMNI_REPOSITORY_QUEUE_MAX_MB={}", self.lag_bytes / 1_048_576, self.queue_max_bytes / 1_048_576));
        }
        (!why.is_empty()).then(|| format!("repository {}: {}", self.url, why.join("; ")))
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "url": self.url,
            "state": self.state,
            "last_upload_unix": self.last_upload.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()),
            "lag_seconds": (self.lag_seconds * 1000.0).round() / 1000.0,
            "lag_bytes": self.lag_bytes,
            "queue_depth": self.queue_depth,
            "queue_logical_backups": self.queue_logical_backups,
            "queue_max_bytes": self.queue_max_bytes,
            "queue_full": self.queue_full(),
            "uploaded_objects": self.uploaded_objects,
            "uploaded_bytes": self.uploaded_bytes,
            "failures": self.failures,
            "attempts": self.attempts,
            "next_retry_s": self.next_retry.map(|t| (t.saturating_duration_since(Instant::now()).as_secs_f64() * 10.0).round() / 10.0),
            "last_error": self.last_error,
            "conditional_writes": self.conditional_writes,
            "encryption": self.encryption,
            "warnings": self.warnings,
            "heartbeat": self.heartbeat,
            "last_verified": last_verified(),
            "retention": {
                "delete": self.retention.delete,
                "window_s": self.retention.window_s,
                "last_run_unix": self.retention.last_run.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()),
                "deleted_objects": self.retention.deleted_objects,
                "kept_past_window": self.retention.kept_past_window,
                "unreadable": self.retention.unreadable,
                "summary": self.retention_summary(),
            },
        })
    }

    /// One sentence on retention in the repository, for people.
    pub fn retention_summary(&self) -> String {
        let r = &self.retention;
        let unreadable = match r.unreadable {
            0 => String::new(),
            n => format!("; {n} encrypted manifests or history files cannot be read here (no plain copy beside repository.json): their base backups and all WAL are kept"),
        };
        if r.delete {
            return format!("objects older than OMNI_REPOSITORY_WINDOW ({} s) that no kept base backup needs are deleted; {} deleted since the start{unreadable}", r.window_s, r.deleted_objects);
        }
        let kept = match r.kept_past_window {
            Some(n) => format!("; {n} objects past OMNI_REPOSITORY_WINDOW are kept"),
            None => String::new(),
        };
        format!("deletion is off (OMNI_REPOSITORY_DELETE=false): nothing is ever deleted in the repository, the bucket's lifecycle rules decide{kept}{unreadable}")
    }

    /// The `omni_repository_*` lines of `/metrics`.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, kind: &str, help: &str, value: String| metric(&mut out, name, kind, help, value);
        gauge("omni_repository_lag_seconds", "gauge", "Age of the oldest local WAL or backup not yet in the off-site repository (0 when none).", self.lag_seconds.to_string());
        gauge("omni_repository_lag_bytes", "gauge", "Bytes complete locally and not yet in the off-site repository.", self.lag_bytes.to_string());
        gauge("omni_repository_queue_depth", "gauge", "Objects waiting to be uploaded to the off-site repository.", self.queue_depth.to_string());
        gauge("omni_repository_queue_full", "gauge", "1 while more than OMNI_REPOSITORY_QUEUE_MAX_MB waits for upload.", u8::from(self.queue_full()).to_string());
        gauge("omni_repository_uploaded_objects_total", "counter", "Objects confirmed in the off-site repository since the start.", self.uploaded_objects.to_string());
        gauge("omni_repository_uploaded_bytes_total", "counter", "Bytes confirmed in the off-site repository since the start.", self.uploaded_bytes.to_string());
        gauge("omni_repository_failures_total", "counter", "Failed upload rounds since the start.", self.failures.to_string());
        gauge("omni_repository_encrypted", "gauge", "1 when what goes to the off-site repository is encrypted (OMNI_ENCRYPT_*).", u8::from(self.encryption != "off").to_string());
        if let Some(age) = self.last_upload.and_then(|t| t.elapsed().ok()) {
            gauge("omni_repository_last_upload_age_seconds", "gauge", "Seconds since an upload to the off-site repository was last confirmed.", age.as_secs_f64().to_string());
        }
        if let Some(v) = last_verified() {
            out.push_str(&v.metrics());
        }
        let _ = writeln!(out, "# HELP omni_repository_state 1 for the state the off-site shipper is in.\n# TYPE omni_repository_state gauge");
        for s in [RepositoryState::Starting, RepositoryState::Ok, RepositoryState::Retrying, RepositoryState::Stopped] {
            let _ = writeln!(out, "omni_repository_state{{state=\"{}\"}} {}", s.as_str(), u8::from(self.state == s));
        }
        out
    }
}

/// One metric of `/metrics`: its help, its type and its value.
fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: String) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

/// Unix seconds, with milliseconds.
fn unix(at: DateTime<Utc>) -> String {
    (at.timestamp_millis() as f64 / 1000.0).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_or_a_failure_degrades_and_says_why() {
        let mut v = RepositoryView::new("s3://b/p".into(), 10 * 1_048_576, true, 3600);
        assert_eq!(v.degraded(), None);
        v.lag_bytes = 11 * 1_048_576;
        assert!(v.degraded().unwrap().contains("OMNI_REPOSITORY_QUEUE_MAX_MB=10"), "{:?}", v.degraded());
        v.lag_bytes = 0;
        v.state = RepositoryState::Stopped;
        v.last_error = Some("the object x already exists with other content".into());
        assert!(v.degraded().unwrap().contains("already exists"));
        let text = v.metrics();
        assert!(text.contains("omni_repository_state{state=\"stopped\"} 1"), "{text}");
        assert_eq!(v.to_json()["state"], "stopped");
        assert_eq!(v.to_json()["retention"]["delete"], true);
    }

    #[test]
    fn the_status_says_when_deletion_is_off() {
        let mut v = RepositoryView::new("s3://b/p".into(), 1_048_576, false, 60);
        v.retention.kept_past_window = Some(3);
        let r = &v.to_json()["retention"];
        assert_eq!((r["delete"].as_bool(), r["kept_past_window"].as_u64()), (Some(false), Some(3)));
        let summary = r["summary"].as_str().unwrap();
        assert!(summary.contains("deletion is off (OMNI_REPOSITORY_DELETE=false)") && summary.contains("3 objects past"), "{summary}");
    }

    #[test]
    fn a_failed_offsite_drill_degrades_names_the_object_and_keeps_the_last_success() {
        let passed = Utc::now() - chrono::TimeDelta::hours(1);
        let mut v = Verified {
            at: Utc::now(),
            ok: false,
            base_backup: Some("B".into()),
            manifest_only: false,
            damaged_object: Some("g/base/B/base.tar.lz4".into()),
            error: Some("file:///r: g/base/B/base.tar.lz4 is damaged".into()),
            summary: String::new(),
            app_tables: None,
            objects: 1,
            bytes: 10,
            took_ms: 5,
            last_success: Some(passed),
        };
        assert!(v.degraded().unwrap().contains("g/base/B/base.tar.lz4"), "{:?}", v.degraded());
        let text = v.metrics();
        assert!(text.contains("omni_repository_drill_ok 0\n"), "{text}");
        assert!(text.contains(&format!("omni_repository_drill_last_success_timestamp_seconds {}\n", unix(passed))), "{text}");
        v.ok = true;
        assert_eq!(v.degraded(), None);
        assert!(v.metrics().contains("omni_repository_drill_ok 1\n"));
    }
}
