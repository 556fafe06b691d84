//! The WAL archive on disk: its directories, who owns them, the segments in
//! them, and the `restore_command` that reads them back.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::privilege::{self, Account};

/// Where the streamer writes now.
pub fn stream_dir(wal_dir: &Path) -> PathBuf {
    wal_dir.join("stream")
}

/// Where base backups live.
pub fn base_dir(wal_dir: &Path) -> PathBuf {
    wal_dir.join("base")
}

/// Creates `OMNI_WAL_DIR` with `stream/` and `base/` (mode 0700), owned by
/// PostgreSQL's account, which runs the tools that write there.
pub fn prepare(wal_dir: &Path, account: &Account) -> Result<()> {
    for dir in [wal_dir.to_path_buf(), stream_dir(wal_dir), base_dir(wal_dir)] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)
            .with_context(|| format!("could not create {} (OMNI_WAL_DIR)", dir.display()))?;
        if account.switch {
            std::os::unix::fs::chown(&dir, Some(account.uid), Some(account.gid))
                .with_context(|| format!("could not give {} to user {} (OMNI_WAL_DIR)", dir.display(), account.name))?;
        }
    }
    privilege::check_reachable(wal_dir, account).context("OMNI_WAL_DIR")
}

/// Every stream directory, the current one first, then earlier ones newest first.
pub fn stream_dirs(wal_dir: &Path) -> Vec<PathBuf> {
    let mut earlier: Vec<PathBuf> = std::fs::read_dir(wal_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stream-") && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    earlier.sort();
    earlier.reverse();
    let mut dirs = vec![stream_dir(wal_dir)];
    dirs.extend(earlier);
    dirs
}

/// A WAL segment file: `TTTTTTTTXXXXXXXXYYYYYYYY`, maybe `.partial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    /// The 24-hex-digit name without `.partial`.
    pub name: String,
    pub partial: bool,
}

impl Segment {
    pub fn parse(path: &Path) -> Option<Segment> {
        let file = path.file_name()?.to_str()?;
        let (name, partial) = match file.strip_suffix(".partial") {
            Some(n) => (n, true),
            None => (file, false),
        };
        (name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Segment { path: path.to_path_buf(), name: name.to_string(), partial })
    }

    /// The position in the WAL stream, whatever the timeline.
    pub fn position(&self) -> &str {
        &self.name[8..]
    }
}

/// Segments in `dir`, in WAL order (position, then timeline).
pub fn segments(dir: &Path) -> Vec<Segment> {
    let mut segs: Vec<Segment> = std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| Segment::parse(&e.path())).collect();
    segs.sort_by(|a, b| (a.position(), &a.name[..8]).cmp(&(b.position(), &b.name[..8])));
    segs
}

/// The newest moment the archive has heard from the server: the time the
/// newest segment file was last written.
pub fn newest_write(wal_dir: &Path) -> Option<std::time::SystemTime> {
    stream_dirs(wal_dir)
        .iter()
        .flat_map(|d| segments(d))
        .filter_map(|s| std::fs::metadata(&s.path).and_then(|m| m.modified()).ok())
        .max()
}

/// WAL segment size (initdb's default, which this project never changes).
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// Bytes free for the archive on `dir`'s file system.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Removes `.partial` segments that are neither empty nor full size: what
/// `pg_receivewal` leaves when its disk fills while it pads a new segment
/// with zeros (before any WAL is written into it). It refuses to start on
/// such a file ("has N bytes, should be 0 or 16777216"), so streaming would
/// never resume; the slot still holds that WAL, which is streamed again.
pub fn remove_short_partials(stream: &Path) -> usize {
    let mut removed = 0;
    for seg in segments(stream).into_iter().filter(|s| s.partial) {
        let len = std::fs::metadata(&seg.path).map(|m| m.len()).unwrap_or(0);
        if len != 0 && len != SEGMENT_BYTES {
            tracing::warn!("removing {} ({len} bytes: cut short while being padded, the disk was full); its WAL is streamed again from the slot", seg.path.display());
            if std::fs::remove_file(&seg.path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// `restore_command` for recovery from this archive: a segment is looked up
/// in every stream directory, complete files first, then `.partial` ones
/// (the newest segment is only ever `.partial`; recovery to `latest` ends
/// inside it). Only "not found" exits 1, which recovery reads as "no more
/// WAL"; a copy that fails (a full disk, an I/O error) exits 255: PostgreSQL
/// treats an exit status above 125 like a signal and stops the recovery
/// with an error, rather than ending it early with part of the WAL.
pub fn restore_command(wal_dir: &Path) -> String {
    let dirs: Vec<String> = stream_dirs(wal_dir).iter().map(|d| shell_quote(&d.display().to_string())).collect();
    let dirs = dirs.join(" ");
    let command = format!(
        "for d in {dirs}; do [ -f \"$d/%f\" ] && {{ cp \"$d/%f\" \"%p\" && exit 0; exit 255; }}; done; \
         for d in {dirs}; do [ -f \"$d/%f.partial\" ] && {{ cp \"$d/%f.partial\" \"%p\" && exit 0; exit 255; }}; done; exit 1"
    );
    command
}

/// Single-quoted for `sh`, with `%` doubled for PostgreSQL's own substitution.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''").replace('%', "%%"))
}

/// Moves `stream/` aside after a restore: the restored cluster continues on
/// a new timeline from a point inside it, and the streamer starts afresh in
/// an empty directory at its slot's position. The old files stay readable
/// by later restores.
pub fn retire_stream(wal_dir: &Path, stamp: &str, account: &Account) -> Result<PathBuf> {
    let from = stream_dir(wal_dir);
    let to = wal_dir.join(format!("stream-{stamp}"));
    std::fs::rename(&from, &to).with_context(|| format!("could not move {} to {}", from.display(), to.display()))?;
    prepare(wal_dir, account)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_are_read_with_their_partial_mark() {
        let s = Segment::parse(Path::new("/w/00000002000000000000000A.partial")).unwrap();
        assert!(s.partial);
        assert_eq!(s.name, "00000002000000000000000A");
        assert_eq!(s.position(), "000000000000000A");
        assert!(Segment::parse(Path::new("/w/00000002.history")).is_none());
        assert!(Segment::parse(Path::new("/w/backup_label")).is_none());
    }

    #[test]
    fn restore_command_quotes_paths_and_falls_back_to_partial_segments() {
        let cmd = restore_command(Path::new("/srv/it's 100%"));
        assert!(cmd.contains("'/srv/it'\\''s 100%%/stream'"), "{cmd}");
        let full = cmd.find("\"$d/%f\" \"%p\"").unwrap();
        let partial = cmd.find("%f.partial").unwrap();
        assert!(full < partial, "complete segments are preferred: {cmd}");
    }
}
