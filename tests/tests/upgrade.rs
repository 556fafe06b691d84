//! Major upgrades in place (issue 13): a cluster made by Debian's PostgreSQL
//! 15, with data written through the API, met by the gateway with PostgreSQL
//! 17 binaries. Every injected failure must leave the PostgreSQL 15 cluster
//! where it was, followed by a start that works and shows the original data.

use crate::gateway;

use std::path::{Path, PathBuf};
use std::time::Duration;

use omni_tests::{bin_path, pg17_bin_dir, wait_until, Request, TempDir};
use serde_json::json;
use gateway::{postgres_pids_on, workdir, Gateway, GatewayBuilder};

const PG15: &str = "/usr/lib/postgresql/15/bin";
/// Preferences written through the API before the upgrade.
const ROWS: usize = 40;

fn pg17() -> String {
    pg17_bin_dir().display().to_string()
}

/// A gateway on `dir` with the binaries in `bin`; the data directory is `data` when given.
fn gateway_with(dir: &Path, bin: &str, data: Option<&Path>) -> GatewayBuilder {
    let b = GatewayBuilder::new(dir).env("PGSERVE_BIN_DIR", bin);
    match data {
        Some(data) => b.env("PGSERVE_DATA_DIR", data.display().to_string()),
        None => b,
    }
}

/// Makes a PostgreSQL 15 cluster in `dir` (at `data`, default `./data/postgres`)
/// with [`ROWS`] preferences written through the API; returns the session holding them.
fn cluster_15_with_data(dir: &Path, data: Option<&Path>) -> String {
    let mut gw = gateway_with(dir, PG15, data).start();
    let session = uuid::Uuid::new_v4().to_string();
    for i in 0..ROWS {
        let r = Request::new("POST", "/api/v1/preferences").port(gw.port).session(&session).json(&json!({"key": format!("k{i}"), "value": format!("value {i}")})).send();
        assert!(r.status == 200 || r.status == 201, "writing a preference: {} {}", r.status, r.text());
    }
    assert!(gw.terminate().success(), "{}", gw.log());
    session
}

/// Every preference written before the upgrade reads back, through the API.
fn assert_original_data(gw: &Gateway, session: &str) {
    let all = Request::get("/api/v1/preferences").port(gw.port).session(session).send();
    assert_eq!(all.status, 200, "{}", all.text());
    let rows = all.json();
    let rows = rows.as_array().unwrap_or_else(|| panic!("a list of preferences: {rows}"));
    assert_eq!(rows.len(), ROWS, "every row written before the upgrade: {rows:?}\n{}", gw.log());
    let one = Request::get("/api/v1/preferences/k7").port(gw.port).session(session).send();
    assert_eq!(one.status, 200, "{}", one.text());
    assert!(one.text().contains("value 7"), "{}", one.text());
}

fn major(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("PG_VERSION")).ok()?.trim().parse().ok()
}

/// `<data><suffix>` beside the data directory.
fn beside(data: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", data.display()))
}

/// The PostgreSQL 15 cluster is where it was and nothing of the upgrade is left.
fn assert_untouched_15(data: &Path, log: &str) {
    assert_eq!(major(data), Some(15), "the old cluster must be back in place:\n{log}");
    for leftover in [".upgrade-pg17", ".upgrade.json", ".pg15"] {
        assert!(!beside(data, leftover).exists(), "{leftover} must not remain after a rollback:\n{log}");
    }
}

/// The upgrade's state file's step, once it exists.
fn state_step(data: &Path) -> Option<String> {
    let text = std::fs::read_to_string(beside(data, ".upgrade.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["step"].as_str().map(str::to_owned)
}

/// `omni-gateway <args>` in `cwd` with the binaries in `bin`: success, stdout, stderr.
fn cli(cwd: &Path, bin: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin_path("omni-gateway"))
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVE_BIN_DIR", bin)
        .env("LOG_LEVEL", "info")
        .output()
        .expect("running omni-gateway");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn an_older_cluster_is_upgraded_at_start_and_cleanup_deletes_the_old_copy() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let session = cluster_15_with_data(dir.path(), None);

    // --check tries it and changes nothing.
    let (ok, stdout, stderr) = cli(dir.path(), &pg17(), &["upgrade", "--check"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("upgrade check passed") && stdout.contains("pg_upgrade --"), "{stdout}");
    assert!(stderr.contains("Clusters are compatible"), "pg_upgrade --check ran:\n{stderr}");
    assert_untouched_15(&data, &stderr);
    // doctor says what the start will do.
    let (_, stdout, _) = cli(dir.path(), &pg17(), &["doctor"]);
    let row = stdout.lines().find(|l| l.starts_with("cluster version")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.contains("ok") && row.contains("the start upgrades it to 17") && row.contains(PG15), "{row}");

    let mut gw = gateway_with(dir.path(), &pg17(), None).start();
    let log = gw.log();
    for progress in ["upgrade step 1/4", "upgrade step 3/4: pg_upgrade", "Copying user relation files", "upgrade done"] {
        assert!(log.contains(progress), "progress line {progress:?} missing:\n{log}");
    }
    assert_eq!(major(&data), Some(17), "{log}");
    let old_copy = beside(&data, ".pg15");
    assert_eq!(major(&old_copy), Some(15), "the old cluster is kept beside it:\n{log}");
    assert_original_data(&gw, &session);
    assert_eq!(gw.get("/health").status, 200);
    let status = gw.get("/gateway/status").json();
    let summary = status["upgrade"]["summary"].as_str().unwrap_or_else(|| panic!("no upgrade in {status}"));
    assert!(summary.contains("upgraded from PostgreSQL 15 to 17 on ") && summary.contains(&format!("old copy kept at {}", old_copy.display())), "{summary}");
    wait_until(Duration::from_secs(60), "vacuumdb --analyze-in-stages to finish", || gw.log().contains("planner statistics rebuilt").then_some(()));
    assert!(gw.terminate().success(), "{}", gw.log());

    let (ok, stdout, stderr) = cli(dir.path(), &pg17(), &["upgrade", "--cleanup"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("deleted the PostgreSQL 15 cluster"), "{stdout}");
    assert!(!old_copy.exists(), "--cleanup deletes the old copy");

    // The next start is an ordinary one, on the upgraded data.
    let mut again = gateway_with(dir.path(), &pg17(), None).start();
    assert!(!again.log().contains("upgrade step"), "{}", again.log());
    assert_original_data(&again, &session);
    assert!(again.get("/gateway/status").json()["upgrade"]["summary"].as_str().unwrap_or_default().contains("old copy deleted"));
    assert!(again.terminate().success());
}

#[test]
fn upgrade_on_demand_refuses_beside_a_running_server_and_upgrades_a_stopped_cluster() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let session = cluster_15_with_data(dir.path(), None);

    let mut running = gateway_with(dir.path(), PG15, None).start();
    let (ok, stdout, stderr) = cli(dir.path(), &pg17(), &["upgrade"]);
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("a gateway (pid {}) holds its lock", running.child.pid())) && stderr.contains("postgres.lock"), "{stderr}");
    assert_untouched_15(&data, &stderr);
    assert!(running.terminate().success());

    let (ok, stdout, stderr) = cli(dir.path(), &pg17(), &["upgrade"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("upgraded from PostgreSQL 15 to 17 on "), "{stdout}");
    assert_eq!(major(&data), Some(17));
    let mut gw = gateway_with(dir.path(), &pg17(), None).start();
    assert!(!gw.log().contains("upgrade step"), "already upgraded:\n{}", gw.log());
    assert_original_data(&gw, &session);
    assert!(gw.terminate().success());
}

#[test]
fn missing_old_binaries_refuse_the_start_naming_what_to_install() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let session = cluster_15_with_data(dir.path(), None);
    let empty = TempDir::new("no-bins");

    let (status, log) = gateway_with(dir.path(), &pg17(), None).env("PGSERVE_OLD_BIN_DIR", empty.path().display().to_string()).run_to_exit();
    assert!(!status.success(), "{log}");
    for words in ["created by PostgreSQL 15", "PGSERVE_OLD_BIN_DIR", "apt-get install postgresql-15"] {
        assert!(log.contains(words), "the refusal names {words:?}:\n{log}");
    }
    assert_untouched_15(&data, &log);

    let mut gw = gateway_with(dir.path(), PG15, None).start();
    assert_original_data(&gw, &session);
    assert!(gw.terminate().success());
}

#[test]
fn upgrades_off_keep_the_refusal_with_instructions() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    cluster_15_with_data(dir.path(), None);
    let (status, log) = gateway_with(dir.path(), &pg17(), None).env("PGSERVE_AUTO_UPGRADE", "false").run_to_exit();
    assert!(!status.success(), "{log}");
    assert!(log.contains("created by PostgreSQL 15") && log.contains("pg_upgrade --old-bindir"), "{log}");
    assert!(!log.contains("upgrade step"), "{log}");
    assert_untouched_15(&data, &log);
}

#[test]
fn a_newer_cluster_is_refused_naming_the_binaries_to_install() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let mut gw = gateway_with(dir.path(), &pg17(), None).start();
    assert!(gw.terminate().success());
    let (status, log) = gateway_with(dir.path(), PG15, None).run_to_exit();
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("newer than the binaries in {PG15} (PostgreSQL 15)")), "{log}");
    assert!(log.contains("install PostgreSQL 17") && log.contains("PGSERVE_BIN_DIR"), "{log}");
    assert_eq!(major(&data), Some(17));
}

#[test]
fn a_failing_pg_upgrade_check_is_rolled_back() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let session = cluster_15_with_data(dir.path(), None);
    // A column of type regproc holds OIDs that pg_upgrade cannot carry over:
    // its consistency checks refuse the cluster before anything is copied.
    let mut gw = gateway_with(dir.path(), PG15, None).start();
    gw.db().batch_execute("CREATE TABLE holds_oids (f regproc); INSERT INTO holds_oids VALUES ('now')").unwrap();
    assert!(gw.terminate().success());

    let (status, log) = gateway_with(dir.path(), &pg17(), None).run_to_exit();
    assert!(!status.success(), "{log}");
    assert!(log.contains("pg_upgrade failed") && log.contains("tables_using_reg.txt"), "{log}");
    // What pg_upgrade refused is listed in its logs, kept beside the data directory.
    let kept = beside(&data, ".upgrade-logs");
    assert!(log.contains(&kept.display().to_string()), "{log}");
    let listed = std::process::Command::new("grep").args(["-rl", "holds_oids"]).arg(&kept).output().unwrap();
    assert!(listed.status.success(), "the table pg_upgrade refused is named in {}", kept.display());
    assert!(log.contains("rolled back: the PostgreSQL 15 cluster") && log.contains("is as it was"), "{log}");
    assert_untouched_15(&data, &log);

    let mut gw = gateway_with(dir.path(), PG15, None).start();
    assert_original_data(&gw, &session);
    assert!(gw.terminate().success());
}

#[test]
fn a_cluster_without_data_checksums_is_upgraded_with_them_off() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let session = cluster_15_with_data(dir.path(), None);
    // Clusters of earlier gateway versions had no checksums. The new cluster
    // must match, or pg_upgrade --check refuses the pair.
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{PG15}/pg_checksums"), "--disable", "-D"])
        .arg(&data)
        .output()
        .expect("pg_checksums");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut gw = gateway_with(dir.path(), &pg17(), None).start();
    assert!(gw.log().contains("data checksums off") && gw.log().contains("upgrade done"), "{}", gw.log());
    let checksums: String = gw.db().query_one("SHOW data_checksums", &[]).unwrap().get(0);
    assert_eq!(checksums, "off");
    assert_original_data(&gw, &session);
    assert!(gw.terminate().success());
}

#[test]
fn kill_9_during_pg_upgrade_is_rolled_back_and_the_next_start_upgrades() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let session = cluster_15_with_data(dir.path(), None);

    let mut gw = gateway_with(dir.path(), &pg17(), None).spawn();
    // pg_upgrade proper, while one of the servers it starts (through pg_ctl,
    // so not in the gateway's process tree) runs.
    wait_until(Duration::from_secs(60), "pg_upgrade to run a server", || {
        assert!(gw.child.try_status().is_none(), "the gateway exited:\n{}", gw.log());
        (state_step(&data).as_deref() == Some("upgrading") && !binary_upgrade_servers_on(dir.path()).is_empty()).then_some(())
    });
    gw.child.kill9();
    assert_eq!(state_step(&data).as_deref(), Some("upgrading"), "killed mid-upgrade:\n{}", gw.log());
    let left_running = binary_upgrade_servers_on(dir.path());

    let mut next = gateway_with(dir.path(), &pg17(), None).start();
    let log = next.log();
    assert!(log.contains("was interrupted (step Upgrading") && log.contains("rolled back"), "{log}");
    if !left_running.is_empty() {
        assert!(log.contains("pg_upgrade left running"), "the server pg_upgrade started is stopped before the rollback:\n{log}");
    }
    assert!(left_running.iter().all(|pid| !gateway::alive(*pid)), "servers pg_upgrade left are stopped");
    assert!(log.contains("upgrade done"), "{log}");
    assert_eq!(major(&data), Some(17));
    assert_original_data(&next, &session);
    assert!(next.terminate().success());
    assert!(postgres_pids_on(&beside(&data, ".pg15")).is_empty() && postgres_pids_on(&data).is_empty(), "no server left running");
}

/// Pids of postmasters in binary-upgrade mode (`postgres … -b`): the servers
/// pg_upgrade starts through pg_ctl, outside the gateway's process tree.
/// Only those of this test's upgrade: their command line names `dir`.
fn binary_upgrade_servers_on(dir: &Path) -> Vec<i32> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            args.first().is_some_and(|a| a.ends_with("/postgres")) && args.iter().any(|a| a == "-b") && args.iter().any(|a| a.starts_with(&dir)) && gateway::alive(*pid)
        })
        .collect()
}

/// A tmpfs of `size` mounted at a new directory, unmounted when dropped.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = TempDir::new("tmpfs");
        let status = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"]).arg(dir.path()).status().expect("mount");
        assert!(status.success(), "mount -t tmpfs (the test runs as root)");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[test]
fn a_disk_full_midway_is_rolled_back() {
    let dir = workdir();
    let disk = Tmpfs::mount("400m");
    let data = disk.path().join("postgres");
    let session = cluster_15_with_data(dir.path(), Some(&data));

    let mut gw = gateway_with(dir.path(), &pg17(), Some(&data)).spawn();
    wait_until(Duration::from_secs(60), "the upgrade to reach pg_upgrade proper", || {
        assert!(gw.child.try_status().is_none(), "the gateway exited before the disk filled:\n{}", gw.log());
        (state_step(&data).as_deref() == Some("upgrading")).then_some(())
    });
    // Fill the disk while pg_upgrade works.
    let filler = disk.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![1u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
    }
    let status = gw.child.wait_exit(Duration::from_secs(120));
    let log = gw.log();
    assert!(!status.success(), "the upgrade cannot succeed on a full disk:\n{log}");
    assert!(log.contains("rolled back: the PostgreSQL 15 cluster"), "{log}");
    assert_untouched_15(&data, &log);

    // Space again: the next start upgrades, with every row.
    std::fs::remove_file(&filler).unwrap();
    let mut next = gateway_with(dir.path(), &pg17(), Some(&data)).start();
    assert!(next.log().contains("upgrade done"), "{}", next.log());
    assert_original_data(&next, &session);
    assert!(next.terminate().success());
}

/// `pg_upgrade` moves data, not configuration: the old cluster's own
/// settings (its `postgresql.conf`, `ALTER SYSTEM`, `pg_hba.conf`) are
/// carried into the new cluster, except what the new major would refuse,
/// which is named instead of stopping the start.
#[test]
fn the_old_clusters_own_settings_are_carried_over_and_removed_ones_named() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    {
        let mut gw = gateway_with(dir.path(), PG15, None).start();
        gw.db().batch_execute("ALTER SYSTEM SET maintenance_work_mem = '77MB'").unwrap();
        assert!(gw.terminate().success(), "{}", gw.log());
    }
    let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
    std::io::Write::write_all(&mut conf, b"\n# the user's own\nwork_mem = '7MB'   # for the reports\nold_snapshot_threshold = 5\n").unwrap();
    let mut hba = std::fs::OpenOptions::new().append(true).open(data.join("pg_hba.conf")).unwrap();
    std::io::Write::write_all(&mut hba, b"# the user's own rule\nhost all all 10.11.12.0/24 scram-sha-256\n").unwrap();

    let mut gw = gateway_with(dir.path(), &pg17(), None).start();
    assert_eq!(major(&data), Some(17), "{}", gw.log());
    let mut db = gw.db();
    let show = |db: &mut postgres::Client, name: &str| -> String { db.query_one(&format!("SHOW {name}"), &[]).unwrap().get(0) };
    assert_eq!(show(&mut db, "work_mem"), "7MB", "postgresql.conf's setting carried over");
    assert_eq!(show(&mut db, "maintenance_work_mem"), "77MB", "ALTER SYSTEM's setting carried over");
    let rules: i64 = db.query_one("SELECT count(*) FROM pg_hba_file_rules WHERE address = '10.11.12.0'", &[]).unwrap().get(0);
    assert_eq!(rules, 1, "pg_hba.conf copied");
    let upgrade = gw.get("/gateway/status").json()["upgrade"].clone();
    let skipped = upgrade["settings_skipped"].to_string();
    assert!(skipped.contains("old_snapshot_threshold") && skipped.contains("unknown to the new PostgreSQL major"), "{upgrade}");
    assert!(upgrade["settings_carried"].to_string().contains("work_mem"), "{upgrade}");
    assert!(gw.log().contains("not carried into PostgreSQL 17: old_snapshot_threshold"), "{}", gw.log());
    assert!(gw.terminate().success());
}

#[test]
fn ctrl_c_during_an_upgrade_asks_once_and_the_second_stops_it_rolled_back() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let session = cluster_15_with_data(dir.path(), None);

    let mut gw = gateway_with(dir.path(), &pg17(), None).spawn();
    wait_until(Duration::from_secs(60), "the upgrade to initialise the new cluster", || {
        assert!(gw.child.try_status().is_none(), "the gateway exited:\n{}", gw.log());
        gw.log().contains("upgrade step 2/4").then_some(())
    });
    // A Ctrl-C in a terminal reaches the gateway's process group alone:
    // its children run in their own.
    gw.child.signal_group(libc::SIGINT);
    wait_until(Duration::from_secs(10), "the first Ctrl-C to be answered with a question", || gw.log().contains("press Ctrl-C again").then_some(()));
    assert!(gw.child.try_status().is_none(), "one Ctrl-C must not stop an upgrade:\n{}", gw.log());
    assert!(matches!(state_step(&data).as_deref(), Some("preparing" | "upgrading")), "the upgrade goes on:\n{}", gw.log());

    gw.child.signal_group(libc::SIGINT);
    let status = gw.child.wait_exit(Duration::from_secs(60));
    let log = gw.log();
    assert!(status.success(), "a stop asked for is a clean exit ({status}):\n{log}");
    assert!(log.contains("was stopped at step") && log.contains("rolled back"), "the log says where it stopped and that it was rolled back:\n{log}");
    assert!(!log.contains("the upgrade failed"), "a stop is not reported as a failure:\n{log}");
    assert_untouched_15(&data, &log);
    assert!(binary_upgrade_servers_on(dir.path()).is_empty(), "no server of pg_upgrade left:\n{log}");
    assert!(postgres_pids_on(&data).is_empty() && postgres_pids_on(&beside(&data, ".upgrade-pg17")).is_empty(), "no postgres left:\n{log}");

    // Nothing was lost: the next start upgrades, with every row.
    let mut next = gateway_with(dir.path(), &pg17(), None).start();
    assert!(next.log().contains("upgrade done"), "{}", next.log());
    assert_eq!(major(&data), Some(17));
    assert_original_data(&next, &session);
    assert!(next.terminate().success());
}
