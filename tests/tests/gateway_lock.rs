//! One owner per cluster (`<data_dir>.lock`, gateway/src/postgres/lock.rs)
//! and root that never follows a path it did not write: real gateways, real
//! PostgreSQL, the real CLI, on free ports in temporary directories.
//!
//! The planted-file test needs root (as in the Docker image, where the
//! gateway is root and the worker's group may add files beside the data
//! directory); as another user it says so and returns.

use crate::gateway;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{account_ids, is_root, pg_bin_dir};

/// A refusal "at once": no waiting on anything, just the process's own start.
const AT_ONCE: Duration = Duration::from_secs(10);

/// [`gateway::cli_env`], timed.
fn cli_env(cwd: &Path, args: &[&str], env: &[(&str, String)]) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let (ok, out, err) = gateway::cli_env(cwd, args, env);
    (ok, out, err, started.elapsed())
}

/// The names in the directory holding the data directory (its siblings: state files, copies, markers).
fn siblings(gw: &Gateway) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(gw.cwd.join("data")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_second_gateway_refuses_at_once_naming_the_first_which_keeps_serving() {
    let dir = workdir();
    let mut first = GatewayBuilder::new(dir.path()).start();
    let holder = first.child.pid();
    let before = first.pid_of("postgres");

    let started = Instant::now();
    let (status, log) = GatewayBuilder::new(dir.path()).run_to_exit();
    let took = started.elapsed();
    assert!(!status.success(), "{log}");
    assert!(took < AT_ONCE, "refused after {took:?}:\n{log}");
    assert!(log.contains(&format!("a gateway (pid {holder}) holds its lock")) && log.contains("postgres.lock"), "{log}");
    assert!(!log.contains("initializing") && !log.contains("looking for PostgreSQL binaries"), "the second touched nothing:\n{log}");

    // The first keeps serving, on the same PostgreSQL.
    assert_eq!(first.get("/health").status, 200, "{}", first.log());
    first.db().query_one("SELECT 1", &[]).unwrap();
    assert_eq!(first.pid_of("postgres"), before);
    assert_eq!(std::fs::read_to_string(dir.path().join("data/postgres.lock")).unwrap(), format!("{holder} run\n"));
    assert!(first.terminate().success());

    // Released with the first: the next start takes it.
    let mut next = GatewayBuilder::new(dir.path()).start();
    assert!(next.terminate().success());
}

#[test]
fn restore_and_upgrade_beside_a_running_gateway_refuse_at_once_and_change_nothing() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    let holder = gw.child.pid();
    let postgres = gw.pid_of("postgres");
    let before = siblings(&gw);
    let env = [("OMNI_PORT", gw.port.to_string()), ("PGSERVE_PORT", gw.pg_port.to_string())];

    for args in [&["restore", "--to", "latest"][..], &["upgrade"]] {
        let (ok, out, err, took) = cli_env(dir.path(), args, &env);
        assert!(!ok, "{args:?} ran beside the gateway:\n{out}\n{err}");
        assert!(took < AT_ONCE, "{args:?} refused after {took:?}");
        assert!(err.contains(&format!("a gateway (pid {holder}) holds its lock")) && err.contains("postgres.lock"), "{args:?}: {err}");
        assert!(err.contains("nothing was done"), "{args:?}: {err}");
        assert_eq!(siblings(&gw), before, "{args:?} changed something beside the data directory");
    }

    assert_eq!(gw.get("/health").status, 200, "{}", gw.log());
    assert_eq!(gw.pid_of("postgres"), postgres, "PostgreSQL was not restarted");
    gw.db().query_one("SELECT 1", &[]).unwrap();
    assert!(gw.terminate().success());
}

#[test]
fn doctor_beside_a_running_gateway_succeeds_and_says_who_holds_the_cluster() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    let holder = gw.child.pid();
    let env = [("OMNI_PORT", gw.port.to_string()), ("PGSERVE_PORT", gw.pg_port.to_string())];
    let (ok, out, err, _) = cli_env(dir.path(), &["doctor"], &env);
    assert!(ok, "{out}\n{err}");
    let row = out.lines().find(|l| l.starts_with("cluster lock")).unwrap_or_else(|| panic!("no cluster lock row:\n{out}"));
    assert!(row.contains(&format!("a gateway (pid {holder}) holds the cluster")), "{row}");
    // doctor only looked: the gateway still holds it, as a second start shows.
    let (status, log) = GatewayBuilder::new(dir.path()).run_to_exit();
    assert!(!status.success() && log.contains(&format!("pid {holder}")), "{log}");
    assert!(gw.terminate().success());

    let (_, out, _, _) = cli_env(dir.path(), &["doctor"], &[]);
    let row = out.lines().find(|l| l.starts_with("cluster lock")).unwrap_or_else(|| panic!("no cluster lock row:\n{out}"));
    assert!(row.contains("free"), "{row}");
}

/// An upgrade record as `postgres/upgrade.rs` writes it, interrupted at
/// `preparing` (so a start rolls it back: deletes `staging`), naming
/// `staging` and `old_copy`.
fn record(data: &Path, staging: &Path, old_copy: &Path) -> String {
    let major: u32 = std::fs::read_to_string(data.join("PG_VERSION")).unwrap().trim().parse().unwrap();
    serde_json::json!({
        "from": major, "to": major + 1, "step": "preparing", "method": "copy",
        "data_dir": data, "staging": staging, "old_copy": old_copy,
        "old_bin_dir": pg_bin_dir(), "new_bin_dir": pg_bin_dir(),
        "old_port": 1, "new_port": 2, "started_at": 0, "finished_at": null
    })
    .to_string()
}

/// A start that must be refused because of `file`: fails quickly, names it, and says `why`.
fn assert_start_refused(cwd: &Path, file: &Path, why: &str) {
    let (status, log) = GatewayBuilder::new(cwd).run_to_exit();
    assert!(!status.success(), "{log}");
    assert!(log.contains(&file.display().to_string()) && log.contains(why), "expected a refusal naming {} ({why}):\n{log}", file.display());
}

/// Everything outside the cluster, and the cluster itself, as it was.
fn assert_untouched(victim: &Path, outside: &Path, data: &Path) {
    assert_eq!(std::fs::read_to_string(victim).unwrap(), "the victim's own content\n", "the link's target was not touched");
    assert_eq!(std::fs::read_to_string(outside.join("precious")).unwrap(), "keep me\n", "the directory the record names was not removed");
    assert!(data.join("PG_VERSION").is_file() && data.join("base").is_dir(), "the cluster is where it was");
}

#[test]
fn planted_links_and_foreign_state_files_beside_the_data_directory_are_refused_and_nothing_is_touched() {
    if !is_root() {
        eprintln!("SKIPPED: the files are planted by another account than the gateway's; run the tests as root to cover this");
        return;
    }
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let mut gw = GatewayBuilder::new(dir.path()).start();
    gw.db().batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')").unwrap();
    assert!(gw.terminate().success());
    let (pg_uid, pg_gid) = account_ids("postgres");

    // What a planted file would have the gateway (root) destroy.
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "the victim's own content\n").unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), "keep me\n").unwrap();
    let state = dir.path().join("data/postgres.upgrade.json");
    let marker = dir.path().join("data/postgres.creating");
    let hostile = record(&data, &outside, &dir.path().join("outside-copy"));

    // 1. The state file is a link to a file of someone else's.
    std::fs::write(&victim, "the victim's own content\n").unwrap();
    let linked_record = dir.path().join("linked-record.json");
    std::fs::write(&linked_record, &hostile).unwrap();
    std::os::unix::fs::symlink(&linked_record, &state).unwrap();
    assert_start_refused(dir.path(), &state, "symbolic link");
    assert_eq!(std::fs::read_to_string(&linked_record).unwrap(), hostile, "the link's target was not touched");
    assert_untouched(&victim, &outside, &data);
    std::fs::remove_file(&state).unwrap();

    // 2. Written by the PostgreSQL account (`COPY … TO` as the superuser).
    std::fs::write(&state, &hostile).unwrap();
    std::os::unix::fs::chown(&state, Some(pg_uid), Some(pg_gid)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_start_refused(dir.path(), &state, &format!("belongs to uid {pg_uid}"));
    assert_untouched(&victim, &outside, &data);

    // 3. Root's, but writable by anyone.
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_start_refused(dir.path(), &state, "writable by group or others");
    assert_untouched(&victim, &outside, &data);

    // 4. Root's and private, but naming a directory that is no sibling of the cluster.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_start_refused(dir.path(), &state, &format!("names staging {}", outside.display()));
    assert_untouched(&victim, &outside, &data);
    std::fs::remove_file(&state).unwrap();

    // 5. A `.creating` marker (it would have the start empty the cluster) as a link…
    std::os::unix::fs::symlink(&victim, &marker).unwrap();
    assert_start_refused(dir.path(), &marker, "symbolic link");
    assert_untouched(&victim, &outside, &data);
    std::fs::remove_file(&marker).unwrap();
    // … owned by the PostgreSQL account …
    std::fs::write(&marker, "1\n").unwrap();
    std::os::unix::fs::chown(&marker, Some(pg_uid), Some(pg_gid)).unwrap();
    assert_start_refused(dir.path(), &marker, &format!("belongs to uid {pg_uid}"));
    assert_untouched(&victim, &outside, &data);
    // … or writable by anyone.
    std::os::unix::fs::chown(&marker, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_start_refused(dir.path(), &marker, "writable by group or others");
    assert_untouched(&victim, &outside, &data);
    std::fs::remove_file(&marker).unwrap();

    // 6. The password file a link: refused, the target keeps its content.
    let password = dir.path().join("data/postgres.password");
    let real: PathBuf = dir.path().join("password.real");
    std::fs::rename(&password, &real).unwrap();
    std::os::unix::fs::symlink(&victim, &password).unwrap();
    assert_start_refused(dir.path(), &password, "symbolic link");
    assert_untouched(&victim, &outside, &data);
    std::fs::remove_file(&password).unwrap();
    std::fs::rename(&real, &password).unwrap();

    // With the planted files gone the cluster starts, with its data.
    let mut gw = GatewayBuilder::new(dir.path()).start();
    let kept: String = gw.db().query_one("SELECT v FROM kept", &[]).unwrap().get(0);
    assert_eq!(kept, "still here");
    assert!(gw.terminate().success());
}
