//! The WAL archive's disk fills: `OMNI_WAL_DIR` on a small tmpfs (mounted
//! here; the tests run as root). PostgreSQL keeps serving, the `wal`
//! component shows the problem, the slot's retained WAL is capped, and once
//! there is room again streaming resumes by itself (a segment cut short
//! while being padded, which pg_receivewal refuses to start on, is removed;
//! the slot still holds its WAL).

use crate::gateway;

use std::path::Path;
use std::time::Duration;

use gateway::{workdir, GatewayBuilder};
use omni_tests::{wait_until, Tmpfs};

fn base_backups(wal: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(wal.join("base"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".json").map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// A gateway whose `OMNI_WAL_DIR` is a 96 MB tmpfs, streaming with a first
/// verified base backup, then written full (the `wal` component in backoff).
fn gateway_with_a_full_wal_disk(dir: &Path) -> (gateway::Gateway, Tmpfs, postgres::Client) {
    let wal = dir.join("wal");
    let disk = Tmpfs::mount(&wal, "96m");
    let gw = GatewayBuilder::new(dir).env("OMNI_WAL_DIR", wal.display().to_string()).start();
    wait_until(Duration::from_secs(120), "the first verified base backup", || (!base_backups(&wal).is_empty()).then_some(()));
    gw.wait_component("wal", "streaming", Duration::from_secs(60), |c| c["state"] == "ready");

    // Far more WAL than the disk holds.
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE filler (id int, pad text)").unwrap();
    for round in 0..12 {
        db.batch_execute(&format!("INSERT INTO filler SELECT g, repeat('x', 900) FROM generate_series({}, {}) g", round * 20_000, round * 20_000 + 19_999)).unwrap();
    }
    let wal_state = gw.wait_component("wal", "the wal component to say its disk is full", Duration::from_secs(180), |c| {
        c["state"] == "backoff" && c["detail"].as_str().is_some_and(|d| d.contains("OMNI_WAL_DIR is full"))
    });
    println!("wal component with the disk full: {wal_state}");
    (gw, disk, db)
}

/// Waits for the `wal` component to be `ready`, showing its last log lines if it is not.
fn wait_streaming(gw: &gateway::Gateway, why: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while gw.component("wal")["state"] != "ready" {
        if std::time::Instant::now() > deadline {
            let log = gw.log();
            let tail: Vec<&str> = log.lines().filter(|l| l.contains("wal") || l.contains("pg_receivewal")).collect();
            panic!("{why}: {}\n{}", gw.component("wal"), tail[tail.len().saturating_sub(30)..].join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The disk stays full while more than the slot's cap (1 GB) is written: the
/// slot is invalidated, a gap in the archive is unavoidable. Once there is
/// room, streaming resumes at a new slot in a fresh `stream/` (the server no
/// longer has the WAL the old one would continue with), the stream before the
/// gap is kept aside for restores to earlier points, and a new base backup
/// covers what follows.
#[test]
fn pitr_a_wal_disk_full_past_the_slots_cap_resumes_at_a_new_slot_and_takes_a_new_base_backup() {
    let dir = workdir();
    let wal = dir.path().join("wal");
    let (gw, disk, mut db) = gateway_with_a_full_wal_disk(dir.path());
    let before = base_backups(&wal);
    // Each switch moves the WAL position to the next 16 MB segment; the
    // checkpoint then drops what the slot held past its cap.
    wait_until(Duration::from_secs(120), "the streamer's slot to be invalidated", || {
        for _ in 0..16 {
            db.batch_execute("INSERT INTO filler VALUES (-2, 'x'); SELECT pg_switch_wal()").unwrap();
        }
        db.batch_execute("CHECKPOINT").unwrap();
        let s: String = db.query_one("SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'omni_wal'", &[]).unwrap().get(0);
        (s == "lost").then_some(())
    });
    assert_eq!(gw.get("/health").status, 200);

    disk.resize("1024m");
    wait_streaming(&gw, "streaming did not resume at a new slot once there was room");
    assert!(gw.log().contains("lost WAL"), "the gap is said in the log");
    let aside: Vec<_> = std::fs::read_dir(&wal).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("stream-")).collect();
    assert_eq!(aside.len(), 1, "the stream before the gap is kept aside");
    assert!(std::fs::read_dir(aside[0].path()).unwrap().count() > 0, "with its segments");
    wait_until(Duration::from_secs(120), "a base backup after the gap", || (base_backups(&wal).len() > before.len()).then_some(()));
    db.batch_execute("INSERT INTO filler VALUES (-3, 'after the gap')").unwrap();
    gateway::wait_archived(&mut db);
    drop(db);
    drop(gw);
    drop(disk);
}

#[test]
fn pitr_a_full_wal_disk_never_stops_postgres_and_streaming_resumes_once_there_is_room() {
    let dir = workdir();
    let (gw, disk, mut db) = gateway_with_a_full_wal_disk(dir.path());
    assert!(gw.log().contains("No space left on device"), "the log says why:\n{}", gw.log());

    // PostgreSQL keeps serving, reads and writes, and /health stays 200.
    db.batch_execute("INSERT INTO filler VALUES (-1, 'still writing')").unwrap();
    let n: i64 = db.query_one("SELECT count(*) FROM filler", &[]).unwrap().get(0);
    assert_eq!(n, 240_001);
    assert_eq!(gw.get("/health").status, 200, "{}", gw.get("/health").text());
    assert_eq!(gw.component("postgres")["state"], "ready");
    // The slot holds the WAL back, up to a cap.
    let cap: String = db.query_one("SHOW max_slot_wal_keep_size", &[]).unwrap().get(0);
    assert_eq!(cap, "1GB");
    let row = db.query_one("SELECT wal_status, coalesce(safe_wal_size, -1) FROM pg_replication_slots WHERE slot_name = 'omni_wal'", &[]).unwrap();
    let (status, safe): (String, i64) = (row.get(0), row.get(1));
    println!("slot with the disk full: wal_status={status}, safe_wal_size={safe} bytes before the cap");
    assert!(status != "lost", "the slot kept its WAL: {status}");

    // Room again: streaming resumes on its own (the supervisor's backoff retries).
    disk.resize("1024m");
    wait_streaming(&gw, "streaming did not resume once there was room");
    let lsn: String = db.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    wait_until(Duration::from_secs(120), "the streamer to catch up", || {
        let q = format!("SELECT coalesce((SELECT flush_lsn >= '{lsn}'::pg_lsn FROM pg_stat_replication WHERE application_name = 'omni_wal'), false)");
        db.query_one(&q, &[]).unwrap().get::<_, bool>(0).then_some(())
    });
    println!("after freeing space: {}", gw.component("wal"));
    drop(db);
    drop(gw);
    drop(disk);
}
