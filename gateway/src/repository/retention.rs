//! Retention in the repository: `OMNI_REPOSITORY_WINDOW` (default
//! `OMNI_PITR_WINDOW`) decides with the archive's own rules
//! (`pitr::base::keep`, `pitr::base::segment_needed`): every base backup
//! that ended inside the window, for each timeline the newest one before
//! it, never the newest; WAL (whole segments and chunks) only when no kept
//! base backup needs it on its timeline, and the newest timeline's own WAL
//! while no kept backup leads into it. A base backup goes manifest first,
//! so that one cut off halfway is never taken for complete. A base backup
//! without manifest (being uploaded) is left alone. With
//! `OMNI_REPOSITORY_DELETE=false` nothing runs.
//!
//! Encrypted repositories: the server holds public keys only and cannot
//! decrypt its own manifests and `.history` files; it reads the plain
//! copies it kept when it uploaded them (`OMNI_WAL_DIR/repository-plain`,
//! see `store::Repository::get_plain`). A manifest it cannot read (another
//! installation's, or its copy lost) is never guessed at: that backup is
//! kept, and while one is unreadable no WAL is deleted at all (the
//! unreadable backup may need any of it); the status says how many.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::layout::{self, BaseManifest, Object};
use super::store::{Listed, Repository, RepositoryError};
use crate::pitr::{archive, base};

/// The objects of generation `gen` to delete, in the order to delete them.
/// `manifests`: the complete base backups; `histories`: each timeline's
/// `.history` text.
pub fn plan(gen: &str, objects: &[Listed], manifests: &[BaseManifest], histories: &[(u32, String)], now: DateTime<Utc>, window: Duration) -> Vec<String> {
    let backups: Vec<base::BaseBackup> = {
        let mut b: Vec<base::BaseBackup> = manifests.iter().map(|m| m.backup.clone()).collect();
        b.sort_by_key(|b| b.finished_at);
        b
    };
    let mut timelines: Vec<u32> = vec![1];
    for o in objects {
        match layout::parse(&o.path) {
            Some(Object::Segment { segment, .. }) | Some(Object::Chunk { segment, .. }) => timelines.extend(archive::name_timeline(&segment)),
            Some(Object::History { file, .. }) => timelines.extend(archive::name_timeline(&file)),
            _ => {}
        }
    }
    timelines.sort_unstable();
    timelines.dedup();
    let lineages: Vec<archive::Lineage> = timelines
        .iter()
        .map(|t| histories.iter().find(|(h, _)| h == t).map_or_else(|| archive::Lineage::parse(*t, ""), |(_, text)| archive::Lineage::parse(*t, text)))
        .collect();
    // Every timeline counts as alive: the repository keeps at least what
    // the local archive would.
    let kept = base::keep(&backups, &lineages, now, window);
    if kept.is_empty() {
        return Vec::new();
    }
    let mut delete = Vec::new();
    let gone: Vec<&base::BaseBackup> = backups.iter().filter(|b| !kept.contains(b)).collect();
    for b in &gone {
        delete.push(layout::base_manifest(gen, &b.id));
    }
    for b in &gone {
        let dir = layout::base_dir(gen, &b.id);
        delete.extend(objects.iter().filter(|o| o.path.starts_with(&dir) && !o.path.ends_with(layout::MANIFEST)).map(|o| o.path.clone()));
    }
    let newest = lineages.last().expect("timeline 1 at least");
    let newest_served = kept.iter().any(|b| b.serves(newest));
    for o in objects {
        let segment = match layout::parse(&o.path) {
            Some(Object::Segment { segment, .. }) | Some(Object::Chunk { segment, .. }) => segment,
            _ => continue,
        };
        let Some(seg) = archive::Segment::parse(Path::new(&segment)) else { continue };
        let own_newest = archive::name_timeline(&seg.name) == Some(newest.timeline);
        if base::segment_needed(&seg, &kept, &lineages) || (own_newest && !newest_served) {
            continue;
        }
        delete.push(o.path.clone());
    }
    delete
}

/// Applies [`plan`] to generation `gen` of the repository; returns how many
/// objects went.
pub async fn apply(repo: &Repository, gen: &str, window: Duration) -> Result<Planned, RepositoryError> {
    let doomed = planned(repo, gen, window).await?;
    for path in &doomed.delete {
        repo.delete(path).await?;
    }
    Ok(doomed)
}

/// What retention would delete, and what it could not read.
#[derive(Debug, Default)]
pub struct Planned {
    pub delete: Vec<String>,
    /// Manifests it could not read (encrypted, without a plain copy here):
    /// their backups and all WAL are kept.
    pub unreadable: Vec<String>,
}

/// What [`apply`] would delete in generation `gen`, read from the repository
/// (listed, manifests and history files read), deleting nothing.
pub async fn planned(repo: &Repository, gen: &str, window: Duration) -> Result<Planned, RepositoryError> {
    let objects = repo.list(&format!("{gen}/")).await?;
    let mut manifests = Vec::new();
    let mut histories = Vec::new();
    let mut unreadable = Vec::new();
    for o in &objects {
        match layout::parse(&o.path) {
            Some(Object::BaseManifest { .. }) => {
                let bytes = match repo.get_plain(&o.path).await {
                    Ok(b) => b,
                    Err(RepositoryError::Crypt(e)) => {
                        tracing::info!("off-site retention: {e}; that base backup and all WAL are kept");
                        unreadable.push(o.path.clone());
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                match serde_json::from_slice::<BaseManifest>(&bytes) {
                    Ok(m) => manifests.push(m),
                    Err(e) => tracing::warn!("off-site retention: {} is not a manifest this gateway reads ({e}); that base backup is kept", o.path),
                }
            }
            Some(Object::History { file, .. }) => {
                if let Some(t) = archive::name_timeline(&file) {
                    match repo.get_plain(&o.path).await {
                        Ok(text) => histories.push((t, String::from_utf8_lossy(&text).into_owned())),
                        // A timeline's history unknown: its WAL is not judged.
                        Err(RepositoryError::Crypt(_)) => unreadable.push(o.path.clone()),
                        Err(e) => return Err(e),
                    }
                }
            }
            _ => {}
        }
    }
    let mut delete = plan(gen, &objects, &manifests, &histories, Utc::now(), window);
    if !unreadable.is_empty() {
        // Only whole base backups known to be past the window go; WAL stays.
        delete.retain(|p| matches!(layout::parse(p), Some(Object::BaseManifest { .. }) | Some(Object::BaseFile { .. })));
    }
    Ok(Planned { delete, unreadable })
}

/// What a restore from the repository alone can reach, read from the
/// bucket: from the end of the oldest base backup there with its manifest
/// to the time the newest WAL object (whole segment or chunk) was stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsiteWindow {
    /// The end of the oldest complete base backup; `None` before the first.
    pub earliest: Option<DateTime<Utc>>,
    /// When the newest WAL there was stored (its bytes were written before),
    /// at least `earliest`; `None` without a complete base backup, or while
    /// the WAL up to its end has not arrived.
    pub latest: Option<DateTime<Utc>>,
    /// Base backups there with their manifest.
    pub base_backups: usize,
    /// WAL objects there (whole segments and chunks).
    pub wal_objects: usize,
}

/// [`OffsiteWindow`] of generation `gen`, from a listing and the oldest
/// readable manifest.
pub async fn window(repo: &Repository, gen: &str) -> Result<OffsiteWindow, RepositoryError> {
    let objects = repo.list(&format!("{gen}/")).await?;
    let mut manifests: Vec<&Listed> = objects.iter().filter(|o| matches!(layout::parse(&o.path), Some(Object::BaseManifest { .. }))).collect();
    // Ids are the start times: name order is age order.
    manifests.sort_by(|a, b| a.path.cmp(&b.path));
    let mut oldest = None;
    for m in &manifests {
        let bytes = match repo.get_plain(&m.path).await {
            Ok(b) => b,
            Err(RepositoryError::Crypt(e)) => {
                tracing::debug!("off-site window: {e}; the next base backup is the window's start");
                continue;
            }
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<BaseManifest>(&bytes) {
            Ok(manifest) => {
                oldest = Some(manifest.backup);
                break;
            }
            Err(e) => tracing::warn!("off-site window: {} is not a manifest this gateway reads ({e}); the next base backup is the window's start", m.path),
        }
    }
    Ok(window_of(&objects, oldest.as_ref(), manifests.len()))
}

/// The window from a listing and the oldest complete base backup: it is
/// restorable once the WAL there reaches the backup's end.
fn window_of(objects: &[Listed], oldest: Option<&base::BaseBackup>, base_backups: usize) -> OffsiteWindow {
    let mut newest = None;
    let mut reaches = None;
    let mut wal_objects = 0;
    for o in objects {
        let (segment, end) = match layout::parse(&o.path) {
            Some(Object::Segment { segment, .. }) => (segment, archive::SEGMENT_BYTES),
            Some(Object::Chunk { segment, to, .. }) => (segment, to),
            _ => continue,
        };
        wal_objects += 1;
        newest = newest.max(Some(o.modified));
        reaches = reaches.max(archive::segment_lsn(&segment).map(|start| start + end));
    }
    let earliest = oldest.map(|b| b.finished_at);
    let needed = oldest.and_then(|b| b.end_lsn.as_deref()).and_then(archive::parse_lsn).unwrap_or(0);
    let latest = match (earliest, newest, reaches) {
        (Some(e), Some(n), Some(r)) if r >= needed => Some(n.max(e)),
        _ => None,
    };
    OffsiteWindow { earliest, latest, base_backups, wal_objects }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEN: &str = "1-pg17";

    fn backup(id: &str, seg: u64, hours_ago: i64) -> BaseManifest {
        let at = Utc::now() - chrono::Duration::hours(hours_ago);
        let lsn = format!("0/{:X}", seg * archive::SEGMENT_BYTES + 0x28);
        BaseManifest {
            backup: base::BaseBackup {
                id: id.into(),
                started_at: at,
                finished_at: at,
                bytes: 0,
                start_segment: format!("00000001{seg:016X}"),
                timeline: Some(1),
                start_lsn: Some(lsn.clone()),
                end_lsn: Some(lsn),
                system_identifier: None,
            },
            files: Vec::new(),
            recipients: Vec::new(),
        }
    }

    fn listed(path: String) -> Listed {
        Listed { path, size: 1, modified: Utc::now() }
    }

    #[test]
    fn the_window_keeps_its_base_backups_and_the_wal_they_need_and_deletes_manifests_first() {
        // b1 (segment 2, 10 h ago), b2 (segment 5, 5 h ago), b3 (segment 8, now); window 4 h.
        let manifests = [backup("b1", 2, 10), backup("b2", 5, 5), backup("b3", 8, 0)];
        let mut objects: Vec<Listed> = Vec::new();
        for m in &manifests {
            objects.push(listed(layout::base_file(GEN, &m.backup.id, "base.tar.lz4")));
            objects.push(listed(layout::base_manifest(GEN, &m.backup.id)));
        }
        for seg in 1..=9u64 {
            objects.push(listed(layout::wal_segment(GEN, &format!("00000001{seg:016X}"))));
        }
        objects.push(listed(layout::wal_chunk(GEN, "00000001000000000000000A", 0, 0x100)));
        let plan = plan(GEN, &objects, &manifests, &[], Utc::now(), Duration::from_secs(4 * 3600));
        // b2 ended before the window and is the newest such: kept; b1 goes.
        assert_eq!(plan[0], layout::base_manifest(GEN, "b1"), "the manifest goes first: {plan:?}");
        assert!(plan.contains(&layout::base_file(GEN, "b1", "base.tar.lz4")));
        assert!(!plan.iter().any(|p| p.contains("/base/b2/") || p.contains("/base/b3/")), "{plan:?}");
        for seg in 1..=4u64 {
            assert!(plan.contains(&layout::wal_segment(GEN, &format!("00000001{seg:016X}"))), "segment {seg} is before every kept backup: {plan:?}");
        }
        for seg in 5..=9u64 {
            assert!(!plan.contains(&layout::wal_segment(GEN, &format!("00000001{seg:016X}"))), "segment {seg} is needed");
        }
        assert!(!plan.iter().any(|p| p.contains(".chunks/")), "the chunks of the newest segment stay");
    }

    #[test]
    fn the_offsite_window_runs_from_the_oldest_complete_backup_to_the_newest_wal_stored() {
        let now = Utc::now();
        let at = |secs: i64| now - chrono::Duration::seconds(secs);
        let object = |path: String, secs: i64| Listed { path, size: 1, modified: at(secs) };
        // b1 (segment 2) ended 50 s ago, its end 0x28 into segment 2.
        let mut b1 = backup("b1", 2, 0).backup;
        b1.finished_at = at(50);
        let mut objects = vec![
            object(layout::wal_segment(GEN, "000000010000000000000001"), 100),
            object(layout::base_file(GEN, "b1", "base.tar.lz4"), 5),
        ];
        assert_eq!(window_of(&objects, Some(&b1), 1).latest, None, "the WAL up to the backup's end is not there yet");
        objects.push(object(layout::wal_chunk(GEN, "000000010000000000000002", 0, 0x100), 60));
        let w = window_of(&objects, Some(&b1), 1);
        assert_eq!((w.earliest, w.latest, w.wal_objects), (Some(at(50)), Some(at(50)), 2), "reached, stored before it ended: the window is the backup's end");
        objects.push(object(layout::wal_chunk(GEN, "000000010000000000000002", 0x100, 0x300), 10));
        assert_eq!(window_of(&objects, Some(&b1), 1).latest, Some(at(10)));
        assert_eq!(window_of(&objects, None, 0), OffsiteWindow { earliest: None, latest: None, base_backups: 0, wal_objects: 3 }, "no complete base backup: nothing to restore");
    }

    #[test]
    fn nothing_goes_without_a_complete_base_backup() {
        let objects = vec![listed(layout::wal_segment(GEN, "000000010000000000000001")), listed(layout::base_file(GEN, "b1", "base.tar.lz4"))];
        assert!(plan(GEN, &objects, &[], &[], Utc::now(), Duration::from_secs(1)).is_empty());
    }
}
