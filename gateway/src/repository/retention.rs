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
pub async fn apply(repo: &Repository, gen: &str, window: Duration) -> Result<usize, RepositoryError> {
    let objects = repo.list(&format!("{gen}/")).await?;
    let mut manifests = Vec::new();
    let mut histories = Vec::new();
    for o in &objects {
        match layout::parse(&o.path) {
            Some(Object::BaseManifest { .. }) => {
                let bytes = repo.get(&o.path).await?;
                match serde_json::from_slice::<BaseManifest>(&bytes) {
                    Ok(m) => manifests.push(m),
                    Err(e) => tracing::warn!("off-site retention: {} is not a manifest this gateway reads ({e}); that base backup is kept", o.path),
                }
            }
            Some(Object::History { file, .. }) => {
                if let Some(t) = archive::name_timeline(&file) {
                    histories.push((t, String::from_utf8_lossy(&repo.get(&o.path).await?).into_owned()));
                }
            }
            _ => {}
        }
    }
    let doomed = plan(gen, &objects, &manifests, &histories, Utc::now(), window);
    for path in &doomed {
        repo.delete(path).await?;
    }
    Ok(doomed.len())
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
        }
    }

    fn listed(path: String) -> Listed {
        Listed { path, size: 1 }
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
    fn nothing_goes_without_a_complete_base_backup() {
        let objects = vec![listed(layout::wal_segment(GEN, "000000010000000000000001")), listed(layout::base_file(GEN, "b1", "base.tar.lz4"))];
        assert!(plan(GEN, &objects, &[], &[], Utc::now(), Duration::from_secs(1)).is_empty());
    }
}
