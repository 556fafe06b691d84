//! The disaster: a gateway under write load ships its base backup and WAL
//! to a real object store (tests/src/stores.rs); the machine is lost
//! (kill -9, its data directory, WAL archive and backups deleted); a second
//! gateway in an empty directory, with nothing but the repository's URL and
//! credentials, runs `omni-gateway restore --from <url> --to latest` and
//! serves the data. Every write acknowledged more than
//! `OMNI_REPOSITORY_WAL_INTERVAL` + 1 s before the kill is back; what was
//! lost is counted and printed, measured from the kill. The same with
//! `OMNI_RESTORE_IF_EMPTY=true`: a start on an empty data directory
//! restores from the repository by itself.

use crate::gateway;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::{cli_env, oldest_base_backup, wait_for_base_backup, workdir, GatewayBuilder};
use omni_tests::stores::{Kind, StoreServer};
use omni_tests::wait_until;

const WAL_INTERVAL: Duration = Duration::from_secs(1);

/// One row per commit until `stop`; each id with when its commit was
/// acknowledged. `count` is how many were acknowledged so far (ids `0..count`).
fn write_load(mut db: postgres::Client, stop: Arc<AtomicBool>, count: Arc<AtomicUsize>) -> Vec<(i32, Instant)> {
    let mut acked = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match db.execute("INSERT INTO disaster_load VALUES ($1)", &[&i]) {
            Ok(_) => {
                acked.push((i, Instant::now()));
                count.store(acked.len(), Ordering::Release);
            }
            Err(_) => break,
        }
    }
    acked
}

/// Writes the load must have acknowledged before the machine is lost.
const LOAD_WRITES: usize = 1000;

/// The base backup `id` in the store: the name of its `manifest.json` (the
/// object written last), read from the store's own listing.
fn manifest_in_store(store: &StoreServer, prefix: &str, id: &str) -> Option<String> {
    store.list(&format!("{prefix}/")).into_iter().find(|n| n.ends_with(&format!("/base/{id}/manifest.json")))
}

/// How the new machine restores.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `omni-gateway restore --from <url> --to latest`, then a start.
    Command,
    /// A start with `OMNI_RESTORE_IF_EMPTY=true` on an empty directory.
    StartIfEmpty,
}

fn lose_the_machine_then_restore_from_the_bucket(kind: Kind, via: Via) {
    let store = StoreServer::start_new(kind);
    let url = store.url("disaster");
    let env: Vec<(&str, String)> = store.env().iter().map(|(k, v)| (k.as_str(), v.clone())).collect();

    // The machine that will be lost.
    let lost = workdir();
    let mut builder = GatewayBuilder::new(lost.path()).env("OMNI_REPOSITORY_URL", &url).env("OMNI_REPOSITORY_WAL_INTERVAL", "1s");
    for (k, v) in &env {
        builder = builder.env(k, v.clone());
    }
    let mut gw = builder.start();
    wait_for_base_backup(&gw);
    // The base backup is in the repository once the store lists its
    // manifest (written last), whatever the status says meanwhile.
    let id = oldest_base_backup(lost.path());
    let manifest = wait_until(Duration::from_secs(180), &format!("the store to list base/{id}/manifest.json"), || manifest_in_store(&store, "disaster", &id));
    let gen = manifest.split('/').nth(1).expect("<prefix>/<gen>/base/<id>/manifest.json").to_owned();
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE disaster_load (id int PRIMARY KEY)").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (db, stop, count) = (gw.db(), stop.clone(), count.clone());
        std::thread::spawn(move || write_load(db, stop, count))
    };
    // The load runs until it has LOAD_WRITES acknowledged writes and the
    // store holds the WAL of all of them (shipped while the load goes on).
    wait_until(Duration::from_secs(120), &format!("{LOAD_WRITES} acknowledged writes"), || (count.load(Ordering::Acquire) >= LOAD_WRITES).then_some(()));
    let shipped_writes = count.load(Ordering::Acquire);
    let row = db.query_one("SELECT file_name, file_offset::bigint FROM pg_walfile_name_offset(pg_current_wal_lsn())", &[]).unwrap();
    let (segment, offset): (String, u64) = (row.get(0), row.get::<_, i64>(1) as u64);
    let wal = format!("disaster/{gen}/wal/");
    wait_until(Duration::from_secs(60), &format!("the store to hold the WAL of the first {shipped_writes} writes ({segment} up to {offset:#X})"), || {
        store.holds_wal(&wal, &segment, offset).then_some(())
    });
    drop(db);

    // The loss: everything at once, then the machine's disk.
    let data_dir = gw.data_dir();
    let killed_at = gateway::kill9_with_its_postgres(&mut gw);
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    gateway::wait_postgres_gone(&data_dir);
    let lost_log = gw.log();
    std::fs::remove_dir_all(lost.path().join("data")).unwrap();

    // A new machine: the binary, the URL and the credentials.
    let new = workdir();
    let mut builder = GatewayBuilder::new(new.path());
    for (k, v) in &env {
        builder = builder.env(k, v.clone());
    }
    let out = match via {
        Via::Command => {
            let (ok, out, err) = cli_env(new.path(), &["restore", "--from", &url, "--to", "latest"], &env);
            assert!(ok, "omni-gateway restore --from {url} --to latest failed:\n{out}\n{err}\nthe lost gateway's log:\n{lost_log}\nstore log:\n{}", store.log());
            out
        }
        Via::StartIfEmpty => {
            // The data directory exists and is empty, as a new volume is.
            std::fs::create_dir_all(new.path().join("data/postgres")).unwrap();
            builder = builder.env("OMNI_RESTORE_IF_EMPTY", "true").env("OMNI_REPOSITORY_URL", &url);
            String::new()
        }
    };
    if via == Via::Command {
        for progress in ["base backup", "files", "bytes", "WAL:"] {
            assert!(out.contains(progress), "the restore says how far it got ({progress}):\n{out}");
        }
    }
    let gw2 = builder.start();
    if via == Via::StartIfEmpty {
        let log = gw2.log();
        assert!(log.contains("OMNI_RESTORE_IF_EMPTY") && log.contains("restoring latest"), "the start says it restores from the repository:\n{log}");
    }
    let present: HashSet<i32> = gw2.db().query("SELECT id FROM disaster_load", &[]).unwrap().iter().map(|r| r.get(0)).collect();

    let promised = WAL_INTERVAL + Duration::from_secs(1);
    let lost_writes: Vec<Duration> = acked.iter().filter(|(id, _)| !present.contains(id)).map(|(_, at)| killed_at.saturating_duration_since(*at)).collect();
    let broken: Vec<&Duration> = lost_writes.iter().filter(|d| **d > promised).collect();
    let oldest_lost = lost_writes.iter().max().map_or("-".to_string(), |d| format!("{} ms", d.as_millis()));
    println!(
        "{}: {} writes acknowledged, {} restored, {} acknowledged writes lost (the oldest acknowledged {oldest_lost} before the kill); {} lost beyond {} ms",
        kind.name(),
        acked.len(),
        present.len(),
        lost_writes.len(),
        broken.len(),
        promised.as_millis()
    );
    assert!(acked.len() >= LOAD_WRITES, "the load ran: {} writes", acked.len());
    let missing_shipped: Vec<i32> = (0..shipped_writes as i32).filter(|id| !present.contains(id)).collect();
    assert!(missing_shipped.is_empty(), "{}: {} of the {shipped_writes} writes whose WAL the store held before the loss are missing (first: {:?})\n{out}", kind.name(), missing_shipped.len(), missing_shipped.first());
    assert!(broken.is_empty(), "{}: {} writes acknowledged more than {} ms before the loss are missing\n{out}", kind.name(), broken.len(), promised.as_millis());
}

#[test]
fn disaster_s3_rclone_new_machine_restores_latest_from_the_bucket() {
    lose_the_machine_then_restore_from_the_bucket(Kind::Rclone, Via::Command);
}

#[test]
fn disaster_s3_seaweedfs_new_container_on_an_empty_volume_restores_at_start() {
    lose_the_machine_then_restore_from_the_bucket(Kind::Seaweed, Via::StartIfEmpty);
}

#[test]
fn disaster_gcs_new_machine_restores_latest_from_the_bucket() {
    lose_the_machine_then_restore_from_the_bucket(Kind::FakeGcs, Via::Command);
}

#[test]
fn disaster_azure_new_machine_restores_latest_from_the_bucket() {
    lose_the_machine_then_restore_from_the_bucket(Kind::Azurite, Via::Command);
}
