//! The WAL archive on disk: its directories, who owns them, the segments in
//! them, and the `restore_command` that reads them back.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};

use crate::process::privilege::{self, Account};

/// Where the streamer writes now.
pub fn stream_dir(wal_dir: &Path) -> PathBuf {
    wal_dir.join("stream")
}

/// Where base backups live.
pub fn base_dir(wal_dir: &Path) -> PathBuf {
    wal_dir.join("base")
}

/// Asked by retention before it deletes a WAL segment or a base backup
/// directory: `false` keeps it. Set once by the off-site repository's
/// shipper (a layer above, handed down as a value): nothing local goes
/// before its upload is confirmed.
pub type DeletionCheck = Box<dyn Fn(&Path) -> bool + Send + Sync>;

static DELETION_CHECK: std::sync::OnceLock<DeletionCheck> = std::sync::OnceLock::new();

/// Installs the check retention asks ([`may_delete`]); the first one stays.
pub fn set_deletion_check(check: DeletionCheck) {
    let _ = DELETION_CHECK.set(check);
}

/// Whether retention may delete `path` (always, without an off-site repository).
pub fn may_delete(path: &Path) -> bool {
    DELETION_CHECK.get().is_none_or(|check| check(path))
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

/// A WAL segment file: `TTTTTTTTXXXXXXXXYYYYYYYY`, maybe `.partial`, or
/// a completed one sealed (`<name>.lz4.age`, `OMNI_ENCRYPT_LOCAL`: sealed.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    /// The 24-hex-digit name without `.partial` or `.lz4.age`.
    pub name: String,
    pub partial: bool,
    /// Encrypted: only a restore with the identity reads it.
    pub sealed: bool,
}

impl Segment {
    pub fn parse(path: &Path) -> Option<Segment> {
        let file = path.file_name()?.to_str()?;
        let (name, partial, sealed) = match (file.strip_suffix(".partial"), file.strip_suffix(SEGMENT_SUFFIX)) {
            (Some(n), _) => (n, true, false),
            (None, Some(n)) => (n, false, true),
            (None, None) => (file, false, false),
        };
        (name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Segment { path: path.to_path_buf(), name: name.to_string(), partial, sealed })
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
/// A completed segment sealed with `OMNI_ENCRYPT_LOCAL` (`sealed.rs`): `<segment>.lz4.age`.
pub const SEGMENT_SUFFIX: &str = ".lz4.age";

/// The sealed name of a completed segment in `dir`.
pub fn sealed_segment(dir: &Path, segment: &str) -> PathBuf {
    dir.join(format!("{segment}{SEGMENT_SUFFIX}"))
}

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
///
/// An archive with sealed segments (`OMNI_ENCRYPT_LOCAL`) is read by
/// `<gateway> restore-wal <identity file> %f %p <dirs>` instead
/// ([`super::sealed::restore_wal_main`]), with the same exit statuses.
pub fn restore_command(wal_dir: &Path, sealed: Option<(&Path, &str)>) -> String {
    let dirs: Vec<String> = stream_dirs(wal_dir).iter().map(|d| shell_quote(&d.display().to_string())).collect();
    let dirs = dirs.join(" ");
    if let Some((gateway, identity)) = sealed {
        return format!("{} restore-wal {} \"%f\" \"%p\" {dirs}", shell_quote(&gateway.display().to_string()), shell_quote(identity));
    }
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

/// Where a WAL position lies in WAL order: `0/3000060` → its byte position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) + u64::from_str_radix(low, 16).ok()?)
}

/// The WAL position where a segment (`TTTTTTTTXXXXXXXXYYYYYYYY`) begins.
pub fn segment_lsn(name: &str) -> Option<u64> {
    let (log, seg) = (u64::from_str_radix(name.get(8..16)?, 16).ok()?, u64::from_str_radix(name.get(16..24)?, 16).ok()?);
    Some((log << 32) + seg * SEGMENT_BYTES)
}

/// The timeline in a segment's (or history file's) name.
pub fn name_timeline(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

/// `0000000N.history`.
pub fn history_name(timeline: u32) -> String {
    format!("{timeline:08X}.history")
}

/// One stretch of a timeline's history: WAL of timeline `timeline` from
/// position `from` up to (not including) `until`, where the next timeline
/// of the lineage branched off (`None`: the timeline itself, open-ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub timeline: u32,
    pub from: u64,
    pub until: Option<u64>,
}

/// The history of one timeline as PostgreSQL replays it with
/// `recovery_target_timeline`: its ancestors, each up to the point where
/// the next one branched off, then the timeline itself (from its `.history`
/// file, as recovery reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub timeline: u32,
    pub spans: Vec<Span>,
}

impl Lineage {
    /// Parses `0000000N.history` (`<parent>\t<switch LSN>\t<reason>` lines,
    /// oldest ancestor first) of timeline `timeline`.
    pub fn parse(timeline: u32, history: &str) -> Lineage {
        let mut spans = Vec::new();
        let mut from = 0;
        for line in history.lines() {
            let mut fields = line.split_whitespace();
            let (Some(parent), Some(switch)) = (fields.next().and_then(|t| t.parse::<u32>().ok()), fields.next().and_then(parse_lsn)) else { continue };
            spans.push(Span { timeline: parent, from, until: Some(switch) });
            from = switch;
        }
        spans.push(Span { timeline, from, until: None });
        Lineage { timeline, spans }
    }

    fn span(&self, timeline: u32) -> Option<&Span> {
        self.spans.iter().find(|s| s.timeline == timeline)
    }

    /// Whether `timeline` is this one or one of its ancestors.
    pub fn includes(&self, timeline: u32) -> bool {
        self.span(timeline).is_some()
    }

    /// Whether the WAL from `start` to `end` on `timeline` is part of this
    /// history (a base backup taken there is consistent on it).
    pub fn holds(&self, timeline: u32, start: u64, end: u64) -> bool {
        self.span(timeline).is_some_and(|s| start >= s.from && s.until.is_none_or(|u| end <= u))
    }

    /// Whether a segment holds WAL of this history (some of its bytes).
    pub fn needs_segment(&self, seg: &Segment) -> bool {
        let (Some(timeline), Some(start)) = (name_timeline(&seg.name), segment_lsn(&seg.name)) else { return false };
        self.span(timeline).is_some_and(|s| start + SEGMENT_BYTES > s.from && s.until.is_none_or(|u| start < u))
    }

    /// Where this history leaves `timeline` (`None`: never, or not on it).
    pub fn leaves(&self, timeline: u32) -> Option<u64> {
        self.span(timeline).and_then(|s| s.until)
    }
}

/// The lineage of `timeline`, from its `.history` file in the archive
/// (timeline 1, or a timeline whose file is missing: itself alone).
pub fn lineage(wal_dir: &Path, timeline: u32) -> Lineage {
    if timeline > 1 {
        for dir in stream_dirs(wal_dir) {
            if let Ok(text) = std::fs::read_to_string(dir.join(history_name(timeline))) {
                return Lineage::parse(timeline, &text);
            }
        }
    }
    Lineage { timeline, spans: vec![Span { timeline, from: 0, until: None }] }
}

/// Every timeline the archive knows of (from its `.history` files and
/// segment names), oldest first; at least timeline 1.
pub fn timelines(wal_dir: &Path) -> Vec<u32> {
    let mut found = vec![1];
    for dir in stream_dirs(wal_dir) {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let history = name.strip_suffix(".history").filter(|n| n.len() == 8);
            let segment = Segment::parse(&entry.path()).map(|s| s.name[..8].to_string());
            if let Some(t) = history.map(str::to_string).or(segment).and_then(|n| name_timeline(&n)) {
                found.push(t);
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    found
}

/// The newest timeline: the one the cluster continues on.
pub fn newest_timeline(wal_dir: &Path) -> u32 {
    timelines(wal_dir).last().copied().unwrap_or(1)
}

/// `timelines.json` in the archive: when each timeline a restore made began
/// to serve (the restore's end). A timeline serves from then until the next
/// one begins.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TimelineStarts {
    pub timelines: Vec<TimelineStart>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineStart {
    pub timeline: u32,
    pub began_at: DateTime<Utc>,
}

fn timeline_starts_file(wal_dir: &Path) -> PathBuf {
    wal_dir.join("timelines.json")
}

pub fn timeline_starts(wal_dir: &Path) -> TimelineStarts {
    std::fs::read(timeline_starts_file(wal_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Records (once) that `timeline` began to serve at `at`: written whole to a
/// temporary file, flushed, renamed, the directory flushed.
pub fn record_timeline_start(wal_dir: &Path, timeline: u32, at: DateTime<Utc>, account: &Account) -> Result<()> {
    let mut starts = timeline_starts(wal_dir);
    if starts.timelines.iter().any(|s| s.timeline == timeline) {
        return Ok(());
    }
    starts.timelines.push(TimelineStart { timeline, began_at: at });
    starts.timelines.sort_by_key(|s| s.timeline);
    let path = timeline_starts_file(wal_dir);
    crate::pg::cluster::write_secret(&path, &serde_json::to_string_pretty(&starts)?)?;
    if account.switch {
        std::os::unix::fs::chown(&path, Some(account.uid), Some(account.gid)).with_context(|| format!("could not give {} to user {}", path.display(), account.name))?;
    }
    Ok(())
}

/// When `timeline` began to serve: recorded by the restore that made it, or
/// (an archive from before the record) when its `.history` file was
/// written. Timeline 1 serves from the beginning (`None`).
pub fn began_at(wal_dir: &Path, timeline: u32) -> Option<DateTime<Utc>> {
    if timeline <= 1 {
        return None;
    }
    if let Some(s) = timeline_starts(wal_dir).timelines.into_iter().find(|s| s.timeline == timeline) {
        return Some(s.began_at);
    }
    stream_dirs(wal_dir).iter().find_map(|d| std::fs::metadata(d.join(history_name(timeline))).and_then(|m| m.modified()).ok()).map(DateTime::<Utc>::from)
}

/// The timeline that served at wall-clock time `t`: the newest one that
/// had begun by then.
pub fn serving_at(wal_dir: &Path, t: DateTime<Utc>) -> u32 {
    timelines(wal_dir).into_iter().filter(|tl| began_at(wal_dir, *tl).is_none_or(|b| b <= t)).max().unwrap_or(1)
}

/// The newest write of a timeline's own WAL into the archive.
pub fn newest_write_on(wal_dir: &Path, timeline: u32) -> Option<std::time::SystemTime> {
    stream_dirs(wal_dir)
        .iter()
        .flat_map(|d| segments(d))
        .filter(|s| name_timeline(&s.name) == Some(timeline))
        .filter_map(|s| std::fs::metadata(&s.path).and_then(|m| m.modified()).ok())
        .max()
}

/// After a restore, before the restored cluster serves: its `.history`
/// files, and its new timeline's WAL from the fork up to `last_segment`
/// (the segment of its shutdown checkpoint, kept as `.partial`: the
/// streamer resumes inside it), are copied from its `pg_wal` into the
/// current stream directory. The streamer's new slot only holds WAL from
/// the last checkpoint on, and `pg_receivewal` fetches a `.history` file
/// only when it streams that timeline: without this, times right after the
/// restore could not be reached, and a later restore could not tell the
/// timelines apart. Files already there are left as they are.
pub fn seed_stream(wal_dir: &Path, pg_wal: &Path, timeline: u32, last_segment: &str, account: &Account) -> Result<usize> {
    let stream = stream_dir(wal_dir);
    let last = segment_lsn(last_segment).context("not a WAL segment name")?;
    let mut copied = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(pg_wal).with_context(|| format!("reading {}", pg_wal.display()))?.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let Some(file) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        let to = if file.ends_with(".history") && file.len() == 16 {
            stream.join(&file)
        } else if let Some(seg) = Segment::parse(&path).filter(|s| !s.partial && name_timeline(&s.name) == Some(timeline)) {
            match segment_lsn(&seg.name) {
                Some(at) if at < last => stream.join(&seg.name),
                Some(at) if at == last => stream.join(format!("{}.partial", seg.name)),
                _ => continue,
            }
        } else {
            continue;
        };
        let done = stream.join(to.file_name().expect("a file name").to_string_lossy().trim_end_matches(".partial"));
        let sealed = sealed_segment(&stream, &done.file_name().expect("a file name").to_string_lossy());
        if to.exists() || done.exists() || sealed.exists() {
            continue;
        }
        let tmp = stream.join(format!(".{file}.seed"));
        std::fs::copy(&path, &tmp).with_context(|| format!("copying {} into {}", path.display(), stream.display()))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        if account.switch {
            std::os::unix::fs::chown(&tmp, Some(account.uid), Some(account.gid))?;
        }
        std::fs::rename(&tmp, &to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
        copied += 1;
    }
    std::fs::File::open(&stream)?.sync_all().with_context(|| format!("could not flush {}", stream.display()))?;
    Ok(copied)
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
    fn a_lineage_follows_the_history_file() {
        // Timeline 3 left 1 at 0/5000100 (as 2) and 2 at 0/9000000.
        let l = Lineage::parse(3, "1\t0/5000100\tbefore 2026-12-04 19:00:00+00\n\n2\t0/9000000\tno recovery target specified\n");
        assert_eq!(l.spans.len(), 3);
        assert!(l.includes(1) && l.includes(2) && l.includes(3) && !l.includes(4));
        assert_eq!(l.leaves(1), parse_lsn("0/5000100"));
        assert_eq!(l.leaves(3), None);
        // A base backup consistent on 1 before the branch point serves 3; one after it does not.
        assert!(l.holds(1, parse_lsn("0/2000028").unwrap(), parse_lsn("0/2000100").unwrap()));
        assert!(!l.holds(1, parse_lsn("0/6000028").unwrap(), parse_lsn("0/6000100").unwrap()));
        let seg = |name: &str| Segment::parse(Path::new(name)).unwrap();
        assert!(l.needs_segment(&seg("000000010000000000000005")), "the branch point's segment of timeline 1");
        assert!(!l.needs_segment(&seg("000000010000000000000006")), "timeline 1 after the branch point is abandoned");
        assert!(l.needs_segment(&seg("000000020000000000000005")) && l.needs_segment(&seg("000000020000000000000008")));
        assert!(!l.needs_segment(&seg("000000020000000000000009")), "timeline 3 began exactly where segment 9 begins");
        assert!(l.needs_segment(&seg("00000003000000000000000A.partial")));
        assert!(!l.needs_segment(&seg("000000040000000000000001")));
    }

    #[test]
    fn restore_command_quotes_paths_and_falls_back_to_partial_segments() {
        let cmd = restore_command(Path::new("/srv/it's 100%"), None);
        assert!(cmd.contains("'/srv/it'\\''s 100%%/stream'"), "{cmd}");
        let full = cmd.find("\"$d/%f\" \"%p\"").unwrap();
        let partial = cmd.find("%f.partial").unwrap();
        assert!(full < partial, "complete segments are preferred: {cmd}");
        // An encrypted archive: the gateway's own restore-wal, its arguments quoted.
        let cmd = restore_command(Path::new("/srv/it's 100%"), Some((Path::new("/opt/omni gateway"), "/run/s/identity.txt")));
        assert!(cmd.starts_with("'/opt/omni gateway' restore-wal '/run/s/identity.txt' \"%f\" \"%p\" '/srv/it'\\''s 100%%/stream'"), "{cmd}");
    }
}
