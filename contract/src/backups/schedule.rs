//! Scheduled backups (`OMNI_BACKUP_INTERVAL`), with retention applied by
//! every create (`OMNI_BACKUP_KEEP`).
//!
//! The schedule keeps no clock of its own: the next backup is due one
//! interval after the newest backup in the directory, whoever made it. So a
//! worker restart neither resets the clock nor fires at once (unless a backup
//! really is overdue), and two workers briefly running side by side during a
//! reload do not both make one: the second sees the first's file.
//!
//! Several workers on one database (several gateways behind a load
//! balancer) run the schedule only on the leader ([`crate::leader`]): the
//! loop starts when this worker takes the lease and is dropped (a dump in
//! progress killed, its partial file removed) the moment it loses it. So
//! each interval gets exactly one backup, and retention, which follows each
//! create, runs on one worker only. With one backup directory shared by
//! every gateway (the README's "More than one machine"), a new leader counts
//! from the old one's last backup, so a hand-over neither repeats nor resets
//! the clock.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{BackupError, Backups};
use crate::leader::{self, Leadership};

/// Longest single sleep, so the loop notices clock changes and backups made
/// by others in reasonable time.
const MAX_NAP: Duration = Duration::from_secs(60);
/// Wait before retrying after a failed or refused scheduled backup.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// When the next backup is due, given the newest one.
pub fn next_due(newest: Option<SystemTime>, every: Duration, now: SystemTime) -> SystemTime {
    match newest {
        // A newest backup "from the future" (clock moved back) must not stop
        // the schedule for that long: count from now instead.
        Some(taken) if taken <= now => taken + every,
        Some(_) => now + every,
        None => now,
    }
}

/// Runs the schedule whenever this worker leads, until the runtime stops.
pub fn spawn(backups: Arc<Backups>, every: Duration, leadership: Leadership) -> tokio::task::JoinHandle<()> {
    tracing::info!(every_s = every.as_secs(), "scheduled backups on; they run on the worker holding the leader lock");
    let fence = leadership.clone();
    leader::while_leading(leadership, move || run(backups.clone(), every, fence.clone()))
}

/// The schedule's loop, for as long as the caller lets it run.
async fn run(backups: Arc<Backups>, every: Duration, leadership: Leadership) {
    tracing::info!(every_s = every.as_secs(), "scheduled backups: running here (this worker leads)");
    loop {
        let now = SystemTime::now();
        let newest = match backups.newest_time() {
            Ok(newest) => newest,
            Err(error) => {
                tracing::warn!(%error, "scheduled backups: cannot read the backup directory");
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        let due = next_due(newest, every, now);
        if let Ok(wait) = due.duration_since(now) {
            if !wait.is_zero() {
                tokio::time::sleep(wait.min(MAX_NAP)).await;
                continue;
            }
        }
        // Still the leader, on the primary, with the same lease epoch?
        if let Err(why) = leadership.fence().await {
            tracing::warn!(%why, "scheduled backup not started here: this worker cannot prove it leads");
            tokio::time::sleep(leader::TICK).await;
            continue;
        }
        match backups.create().await {
            Ok(created) => tracing::info!(file = %created.backup_file, size_bytes = created.size_bytes, "scheduled backup written"),
            Err(BackupError::Busy) => {
                tracing::info!("scheduled backup postponed: another backup operation is running");
                tokio::time::sleep(RETRY_AFTER.min(every)).await;
            }
            Err(error) => {
                tracing::error!(%error, "scheduled backup failed; retrying later");
                tokio::time::sleep(RETRY_AFTER.min(every)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_backup_counts_from_the_newest() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        assert_eq!(next_due(None, hour, now), now);
        assert_eq!(next_due(Some(now - hour / 2), hour, now), now + hour / 2);
        assert_eq!(next_due(Some(now - 2 * hour), hour, now), now - hour);
        assert_eq!(next_due(Some(now + hour), hour, now), now + hour);
    }
}
