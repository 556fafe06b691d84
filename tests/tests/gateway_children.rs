//! The short commands the gateway runs (the relay's `pg_dump`/`pg_restore`)
//! are children like any other: run as the unprivileged account when the
//! gateway is root, in their own process group, and gone when the gateway
//! stops or is killed with `kill -9`. A surviving `pg_restore --clean` of
//! an old copy would otherwise run beside the copy the next start begins.
//!
//! The copy is held in place by a lock the test takes on the target table:
//! `pg_restore --clean` waits on it to drop the table.

use crate::gateway;
use crate::kit;

use std::time::Duration;

use gateway::{alive, workdir, Gateway, GatewayBuilder};
use kit::target_database;
use omni_tests::{account_ids, is_root, wait_until, TempPostgres};

/// Live `pg_dump`/`pg_restore` processes working for the gateway `gateway_pid`
/// (their command line names its copy's directory `omni-relay-<pid>-…`).
fn relay_tools(gateway_pid: u32) -> Vec<i32> {
    let mark = format!("omni-relay-{gateway_pid}-");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).replace('\0', " ")).unwrap_or_default();
            (cmdline.contains("pg_dump") || cmdline.contains("pg_restore")) && cmdline.contains(&mark) && alive(*pid)
        })
        .collect()
}

/// The private socket directories of the gateway `gateway_pid` in the
/// temporary directory (`omni-api-<pid>-…`, `omni-pg-<pid>-…`).
fn socket_dirs_of(gateway_pid: u32) -> Vec<std::path::PathBuf> {
    let marks = [format!("omni-api-{gateway_pid}-"), format!("omni-pg-{gateway_pid}-")];
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|name| marks.iter().any(|m| name.starts_with(m.as_str()))))
        .map(|e| e.path())
        .collect()
}

/// Processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()) == Some(parent)
        })
        .collect()
}

/// The `pg_restore` into the target, once it runs (waiting on the test's lock).
fn wait_restore_running(gw: &Gateway) -> i32 {
    let gateway_pid = gw.child.pid();
    wait_until(Duration::from_secs(90), "the relay's pg_restore into the target", || {
        relay_tools(gateway_pid).into_iter().find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).contains("--single-transaction")).unwrap_or(false)
        })
    })
}

/// Real, effective, saved and filesystem uids, and the process group, from /proc.
fn uids_and_group(pid: i32) -> (Vec<u32>, i32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap().split_whitespace().skip(1).map(|u| u.parse().unwrap()).collect();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name: state, ppid, pgrp.
    let pgrp = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(2).unwrap().parse().unwrap();
    (uids, pgrp)
}

#[test]
fn the_relays_pg_restore_runs_unprivileged_and_is_gone_after_a_stop_and_after_kill_9() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();

    // A table in the embedded database, so the copy has something to restore.
    let mut gw = GatewayBuilder::new(dir.path()).start();
    gw.db().batch_execute("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items SELECT generate_series(1, 100)").unwrap();
    assert!(gw.terminate().success(), "{}", gw.log());

    // The same table on the target, locked: pg_restore --clean waits to drop it.
    let mut lock = postgres::Client::connect(&target_url, postgres::NoTls).unwrap();
    lock.batch_execute("CREATE TABLE items (id int PRIMARY KEY)").unwrap();
    let mut held = lock.transaction().unwrap();
    held.batch_execute("LOCK TABLE items IN ACCESS SHARE MODE").unwrap();

    // A stop while the copy runs: the gateway ends and takes pg_restore with it.
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &target_url).start();
    let restore = wait_restore_running(&gw);
    let (uids, group) = uids_and_group(restore);
    if is_root() {
        let postgres = account_ids("postgres").0;
        assert_eq!(uids, vec![postgres; 4], "run as root, the gateway runs pg_restore as PGSERVE_USER, not root");
    }
    assert_eq!(group, restore, "pg_restore leads its own process group");
    let gateway_pid = gw.child.pid();
    assert!(gw.terminate().success(), "{}", gw.log());
    wait_until(Duration::from_secs(15), "no pg_dump/pg_restore of the stopped gateway", || relay_tools(gateway_pid).is_empty().then_some(()));
    wait_until(Duration::from_secs(3), &format!("pg_restore {restore} to be gone after the gateway's stop"), || (!alive(restore)).then_some(()));
    let work = std::env::temp_dir().join(format!("omni-relay-{gateway_pid}-omni"));
    assert!(!work.exists(), "the abandoned copy's dump {} outlived the stop", work.display());

    // kill -9 while the copy runs: nothing of it is left either.
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &target_url).start();
    let restore = wait_restore_running(&gw);
    let gateway_pid = gw.child.pid();
    let children = children_of(gateway_pid);
    // The gateway alone, as `kill -9 <pid>` does (not its process group).
    // SAFETY: kill(2) on the gateway's pid, which the guard has not reaped.
    unsafe { libc::kill(gateway_pid as libc::pid_t, libc::SIGKILL) };
    gw.child.wait_exit(Duration::from_secs(10));
    // Its private socket directories (the worker's, PostgreSQL's) had no
    // cleanup: they are still there, until the next start.
    let sockets = socket_dirs_of(gateway_pid);
    for kind in ["omni-api", "omni-pg"] {
        let named = |p: &std::path::PathBuf| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{kind}-{gateway_pid}-"));
        assert!(sockets.iter().any(named), "the killed gateway's {kind}-{gateway_pid}-* directory is missing: {sockets:?}");
    }
    wait_until(Duration::from_secs(15), "no pg_dump/pg_restore of the killed gateway", || relay_tools(gateway_pid).is_empty().then_some(()));
    // Reparented once the gateway is gone, it may take a moment to die of
    // its parent-death signal: waited for, not asked once.
    wait_until(Duration::from_secs(3), &format!("pg_restore {restore} to die with the killed gateway"), || (!alive(restore)).then_some(()));

    // The next start's copy removes the dump the killed gateway left, and,
    // the lock released, copies everything: nothing of the abandoned copies
    // stands in its way.
    let killed_work = std::env::temp_dir().join(format!("omni-relay-{gateway_pid}-omni"));
    // PostgreSQL dies with the gateway through its parent-death signal, a
    // moment later; a start before that refuses its live postmaster.pid.
    let data = dir.path().join("data/postgres");
    wait_until(Duration::from_secs(15), "the killed gateway's PostgreSQL to exit", || gateway::postgres_pids_on(&data).is_empty().then_some(()));
    // Every child dies of its parent-death signal; a live one's socket would keep its directory.
    wait_until(Duration::from_secs(15), "the killed gateway's children to exit", || children.iter().all(|pid| !alive(*pid)).then_some(()));
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &target_url).start();
    wait_until(Duration::from_secs(60), "the killed gateway's copy directory to be swept", || (!killed_work.exists()).then_some(()));
    // Started, the gateway has made its own socket directories and removed the killed one's.
    assert!(socket_dirs_of(gateway_pid).is_empty(), "left after the next start: {:?}", socket_dirs_of(gateway_pid));
    assert_eq!(socket_dirs_of(gw.child.pid()).len(), 2, "the new gateway's own socket directories: {:?}", socket_dirs_of(gw.child.pid()));
    held.rollback().unwrap();
    let tables = kit::wait_identical(&gw, &target_url, Duration::from_secs(60));
    assert_eq!(tables["public.items"].lines().count(), 100);
}

/// Live `pg_dump` processes whose parent is `parent`.
fn pg_dumps_of(parent: u32) -> Vec<i32> {
    children_of(parent)
        .into_iter()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains("(pg_dump)") && alive(*pid))
        .collect()
}

/// `omni-gateway backup create` runs pg_dump from the backup code the worker
/// runs too: killed with `kill -9` while pg_dump waits (on a lock the test
/// holds), it takes pg_dump with it; before, pg_dump was killed only when
/// the process dropped it, which a `kill -9` never does.
#[test]
fn kill_9_of_the_backup_cli_during_a_slow_pg_dump_leaves_no_pg_dump() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).start();
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE held (id int PRIMARY KEY); INSERT INTO held VALUES (1)").unwrap();
    let mut held = db.transaction().unwrap();
    held.batch_execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE").unwrap();

    let log = dir.path().join("backup-cli.log");
    let env = [("PGSERVE_BIN_DIR".to_owned(), omni_tests::pg_bin_dir().display().to_string()), ("LOG_LEVEL".to_owned(), "info".to_owned())].into_iter().collect();
    let mut command = omni_tests::isolated_command(&omni_tests::bin_path("omni-gateway"), dir.path(), &env, &log);
    command.args(["backup", "create"]);
    let mut backup = omni_tests::ChildGuard::spawn(&mut command);
    let cli_pid = backup.pid();
    let dump = wait_until(Duration::from_secs(60), "the backup CLI's pg_dump", || {
        if let Some(status) = backup.try_status() {
            panic!("the backup CLI ended ({status}) before its pg_dump was seen: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        pg_dumps_of(cli_pid).first().copied()
    });

    // The CLI alone, as `kill -9 <pid>` does (not its process group).
    // SAFETY: kill(2) on the CLI's pid, which the guard has not reaped.
    unsafe { libc::kill(cli_pid as libc::pid_t, libc::SIGKILL) };
    backup.wait_exit(Duration::from_secs(10));
    wait_until(Duration::from_secs(15), "the killed CLI's pg_dump to be gone", || (!alive(dump)).then_some(()));
    assert!(!alive(dump), "pg_dump {dump} outlived kill -9 of the backup CLI");
    held.rollback().unwrap();
}

/// `<data>/postgres.drill-*` scratch directories (a drill's copy).
fn drill_dirs(cwd: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(cwd.join("data"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("postgres.drill-"))
        .map(|e| e.path())
        .collect()
}

/// A scheduled restore drill cancelled by the gateway's stop while its
/// recovery PostgreSQL runs (held there by the test hook) leaves no
/// PostgreSQL on its copy and no copy: the drill's scratch directory goes
/// with it, however it ends.
#[test]
fn a_drill_cancelled_at_stop_leaves_no_postgres_and_no_scratch_copy() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path())
        .env("OMNI_BACKUP_DRILL_INTERVAL", "3s")
        .env("OMNI_TEST_HOLD_RESTORE_STEP", "promoted")
        .start();
    gateway::wait_for_base_backup(&gw);
    let scratch = wait_until(Duration::from_secs(120), "a drill held with its recovery postgres running", || {
        drill_dirs(dir.path()).into_iter().find(|d| d.join("data.restore.held").exists())
    });
    let postmasters = gateway::postgres_pids_on(&scratch);
    assert!(!postmasters.is_empty(), "the drill's postgres runs on {}", scratch.display());

    assert!(gw.terminate().success(), "{}", gw.log());
    wait_until(Duration::from_secs(15), "no postgres on the drill's copy", || gateway::postgres_pids_on(&scratch).is_empty().then_some(()));
    assert!(postmasters.iter().all(|pid| !alive(*pid)), "a postgres of the drill outlived the stop");
    assert_eq!(drill_dirs(dir.path()), Vec::<std::path::PathBuf>::new(), "the drill's copy outlived the stop:\n{}", gw.log());
}
