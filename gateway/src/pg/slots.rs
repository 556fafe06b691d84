//! Replication slots as PostgreSQL keeps them on disk, and the settings
//! slots need. Two features make slots: the WAL streamer (physical,
//! `pitr/`) and the replication relay (logical, `relay/`). A logical slot
//! stops PostgreSQL from starting without `wal_level=logical`, so the
//! cluster itself removes the relay's slots from a stopped data directory
//! when the relay is off and before a major upgrade ([`drop_slots_offline`]).

use std::path::Path;

use anyhow::{Context, Result};

/// The relay names its logical slots `omni_relay_<database>`.
pub const RELAY_SLOT_PREFIX: &str = "omni_relay_";

/// Most WAL a slot may hold back when its reader cannot keep up (its disk
/// is full, it is down): beyond this PostgreSQL drops it rather than fill its
/// own disk, and the slot reports `lost` (the status says so).
pub const MAX_SLOT_WAL_KEEP_MB: u64 = 1024;

/// Server settings a logical slot needs (the relay's). The relay keeps
/// its own cap (`relay.rs`); PostgreSQL's, one for every slot, is never set
/// below the WAL streamer's, so a small relay cap cannot cut point-in-time
/// recovery's stream (its slot is capped at [`MAX_SLOT_WAL_KEEP_MB`]).
pub fn logical_settings(max_wal_mb: u64) -> [String; 2] {
    ["wal_level=logical".to_string(), format!("max_slot_wal_keep_size={}MB", max_wal_mb.max(MAX_SLOT_WAL_KEEP_MB))]
}

/// The relay's slots in a stopped cluster's `pg_replslot`.
pub fn slots_offline(data_dir: &Path) -> Result<Vec<String>> {
    let dir = data_dir.join("pg_replslot");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(RELAY_SLOT_PREFIX) && !name.ends_with(".tmp") && entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Removes the relay's logical slots from a cluster that is not running
/// (the caller holds the cluster's lock and found no live postmaster), as
/// `pg_drop_replication_slot` does on disk: the slot's directory is renamed
/// to `<name>.tmp`, the rename flushed, then the directory removed (a start
/// of PostgreSQL removes a `.tmp` left by a crash in between). A slot lives
/// only in that directory, never in the WAL, so this is the whole drop, and
/// it works on an invalidated slot too. Dropping loses nothing: the target
/// keeps its progress, and the relay copies anew when it finds no slot.
/// Returns the slots removed; `why` is logged with them.
pub fn drop_slots_offline(data_dir: &Path, why: &str) -> Result<Vec<String>> {
    let slots = slots_offline(data_dir)?;
    let dir = data_dir.join("pg_replslot");
    for name in &slots {
        let (from, to) = (dir.join(name), dir.join(format!("{name}.tmp")));
        std::fs::rename(&from, &to).with_context(|| format!("dropping the replication relay's slot: renaming {} to {}", from.display(), to.display()))?;
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).with_context(|| format!("flushing {}", dir.display()))?;
        std::fs::remove_dir_all(&to).with_context(|| format!("dropping the replication relay's slot: removing {}", to.display()))?;
    }
    if !slots.is_empty() {
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).with_context(|| format!("flushing {}", dir.display()))?;
        tracing::warn!(
            "{why}: dropped the replication relay's slots {} (PostgreSQL would refuse to start on them without wal_level=logical); turned on again, the relay makes a full copy",
            slots.join(", ")
        );
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_slots_get_wal_level_logical_and_never_a_cap_below_the_streamers() {
        assert_eq!(logical_settings(64), ["wal_level=logical".to_string(), "max_slot_wal_keep_size=1024MB".to_string()]);
        assert_eq!(logical_settings(4096), ["wal_level=logical".to_string(), "max_slot_wal_keep_size=4096MB".to_string()]);
    }

    #[test]
    fn the_relays_slots_are_found_and_dropped_in_a_stopped_cluster_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("omni-relay-slots-{}", std::process::id()));
        let slots = dir.join("pg_replslot");
        for name in ["omni_relay_omni", "omni_relay_extra", "omni_wal", "other", "omni_relay_x.tmp"] {
            std::fs::create_dir_all(slots.join(name)).unwrap();
            std::fs::write(slots.join(name).join("state"), b"x").unwrap();
        }
        assert_eq!(slots_offline(&dir).unwrap(), ["omni_relay_extra", "omni_relay_omni"]);
        assert_eq!(drop_slots_offline(&dir, "test").unwrap(), ["omni_relay_extra", "omni_relay_omni"]);
        let mut left: Vec<String> = std::fs::read_dir(&slots).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["omni_relay_x.tmp", "omni_wal", "other"]);
        assert!(slots_offline(&dir.join("missing")).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
