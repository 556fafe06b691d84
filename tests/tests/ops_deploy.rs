//! The systemd unit (`deploy/omni-gateway.service`) and the `Dockerfile`
//! (issue 7), checked without a container: `ops_docker.rs` runs both for
//! real (the image under Docker, the unit under systemd in a container);
//! these are the quick checks beside it: `systemd-analyze verify` accepts
//! the unit without a warning; the unit's stop timeout covers
//! the gateway's own stop budget; the gateway started the way the unit starts
//! it (its environment, `ExecStart`, `NOTIFY_SOCKET`, `WATCHDOG_USEC`) does
//! what `Type=notify` and `KillMode=mixed` expect; and the image's entrypoint,
//! run as PID 1 with the image's environment, serves on 0.0.0.0 and its
//! `HEALTHCHECK` command follows it up and down.

use crate::gateway;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway::{alive, postgres_pids_on, workdir};
use omni_tests::{bin_path, free_port, pg_bin_dir, wait_until, ChildGuard, Request};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(rel)
}

// ------------------------------------------------------------ systemd unit

/// `Key=value` lines of the unit's `[Service]` section, in order (keys repeat).
fn service_section() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("deploy/omni-gateway.service")).expect("deploy/omni-gateway.service");
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not Key=value: {line}"));
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    out
}

fn service_value(key: &str) -> String {
    service_section().into_iter().filter(|(k, _)| k == key).map(|(_, v)| v).next_back().unwrap_or_else(|| panic!("the unit sets no {key}="))
}

/// systemd time spans as used in the unit: `75s`, `10min`, `2`.
fn seconds(span: &str) -> u64 {
    let digits: String = span.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("unexpected time span {span:?}"));
    match &span[digits.len()..] {
        "" | "s" => n,
        "min" => n * 60,
        other => panic!("unexpected unit {other:?} in {span:?}"),
    }
}

/// Defaults as `.env.example` lists them (it is generated from config::VARS and checked by a unit test).
fn env_example_default(name: &str) -> String {
    let text = std::fs::read_to_string(repo_file(".env.example")).unwrap();
    text.lines()
        .map(|l| l.trim_start_matches("# ").trim())
        .find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!(".env.example lacks {name}"))
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_without_warnings() {
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd); the unit was not verified");
        return;
    };
    // verify checks that ExecStart exists, so point it at the binary just built.
    let dir = workdir();
    let unit = std::fs::read_to_string(repo_file("deploy/omni-gateway.service")).unwrap();
    let unit = unit.replace("/usr/local/bin/omni-gateway", &bin_path("omni-gateway").display().to_string());
    let path = dir.path().join("omni-gateway.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    // Unknown keys and bad values are only warnings (exit 0): none may appear.
    let about_us: Vec<&str> = stderr.lines().filter(|l| l.contains("omni-gateway")).collect();
    assert!(about_us.is_empty(), "systemd-analyze verify warns about the unit:\n{stderr}");
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

#[test]
fn the_units_stop_timeout_covers_the_gateways_own_drain_and_stop_timeouts() {
    assert_eq!(service_value("KillMode"), "mixed", "SIGTERM must reach the gateway alone: it stops its children in order");
    let drain = seconds(&env_example_default("OMNI_DRAIN_TIMEOUT_S"));
    let stop = seconds(&env_example_default("OMNI_STOP_TIMEOUT_S"));
    // HTTP drain, then the worker's drain (SIGTERM grace), then PostgreSQL's
    // fast shutdown (SIGINT) and, if that overruns, 5 s after SIGQUIT.
    let budget = drain + drain + stop + 5;
    let timeout = seconds(&service_value("TimeoutStopSec"));
    assert!(timeout >= budget + 10, "TimeoutStopSec={timeout}s leaves no margin over the gateway's own {budget}s stop budget");
    assert!(seconds(&service_value("TimeoutStartSec")) >= 60, "initdb and crash recovery must fit in TimeoutStartSec");
}

#[test]
fn the_gateway_started_as_the_unit_starts_it_notifies_ready_watchdog_and_stopping() {
    assert_eq!(service_value("Type"), "notify");
    assert_eq!(service_value("NotifyAccess"), "main");
    let watchdog = Duration::from_secs(seconds(&service_value("WatchdogSec")));
    let dir = workdir();
    let state_dir = dir.path().join("var-lib-omni");
    std::fs::create_dir_all(&state_dir).unwrap();

    // The unit's own environment, with its install paths mapped to this machine.
    let mut env: BTreeMap<String, String> = service_section()
        .into_iter()
        .filter(|(k, _)| k == "Environment")
        .map(|(_, v)| {
            let (k, v) = v.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(!env.contains_key("OMNI_UI_DIR"), "the unit serves the UI built into omni-api: no OMNI_UI_DIR");
    env.insert("XDG_CACHE_HOME".into(), dir.path().join("cache").display().to_string());
    let port = free_port();
    env.insert("OMNI_PORT".into(), port.to_string());
    env.insert("PGSERVE_PORT".into(), free_port().to_string());
    env.insert("PGSERVE_BIN_DIR".into(), pg_bin_dir().display().to_string());

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(watchdog)).unwrap();
    let exec_start = service_value("ExecStart");
    let mut argv = exec_start.split_whitespace();
    assert_eq!(argv.next(), Some("/usr/local/bin/omni-gateway"));
    let mut command = Command::new(bin_path("omni-gateway"));
    command
        .args(argv)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&env)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
        .current_dir(&state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("gateway.log")).unwrap());
    let mut gw = ChildGuard::spawn(&mut command);
    let log = || std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();

    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !(seen.iter().any(|m: &String| m.lines().any(|l| l == "READY=1")) && seen.iter().any(|m| m.lines().any(|l| l == "WATCHDOG=1"))) {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("READY=1 and WATCHDOG=1 expected within WatchdogSec ({e}); seen {seen:?}\n{}", log()));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(Request::get("/health").send_to(port).status, 200, "READY=1 must mean usable");
    let page = Request::get("/").send_to(port);
    assert_eq!((page.status, page.body), (200, std::fs::read(repo_file("ui-dist/index.html")).unwrap()), "the UI built into omni-api");
    let data_dir = state_dir.join("data/postgres");
    assert!(data_dir.join("PG_VERSION").is_file(), "the cluster belongs in the working directory (StateDirectory)");
    let children = postgres_pids_on(&data_dir);
    assert!(!children.is_empty());

    // KillMode=mixed: SIGTERM to the main process only; it must finish well within TimeoutStopSec.
    let started = Instant::now();
    unsafe { libc::kill(gw.pid() as i32, libc::SIGTERM) };
    let status = gw.wait_exit(Duration::from_secs(seconds(&service_value("TimeoutStopSec"))));
    assert!(status.success(), "a stop must exit 0 (Restart=on-failure must not restart it): {status}\n{}", log());
    assert!(started.elapsed() < Duration::from_secs(30), "an idle gateway stops quickly, took {:?}", started.elapsed());
    assert!(children.iter().all(|p| !alive(*p)), "PostgreSQL must be stopped by the gateway, not left for systemd's SIGKILL");
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "STOPPING=1");
    }
    assert!(stopping || seen.iter().any(|m| m.contains("STOPPING=1")), "STOPPING=1 expected at stop");
}

// ------------------------------------------------------------ Dockerfile

/// Instructions of the Dockerfile's last stage: continuation lines joined, comments dropped.
fn final_stage() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("Dockerfile")).expect("Dockerfile at the repository root");
    let mut instructions: Vec<(String, String)> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (op, args) = pending.split_once(' ').unwrap_or((&pending, ""));
        let op = op.to_ascii_uppercase();
        if op == "FROM" {
            instructions.clear();
        }
        instructions.push((op, args.trim().to_owned()));
        pending.clear();
    }
    instructions
}

fn instruction(stage: &[(String, String)], op: &str) -> String {
    stage.iter().filter(|(o, _)| o == op).map(|(_, a)| a.clone()).next_back().unwrap_or_else(|| panic!("the image has no {op}"))
}

/// `ENV A=1 B=2` lines of the stage, as a map.
fn image_env(stage: &[(String, String)]) -> BTreeMap<String, String> {
    stage
        .iter()
        .filter(|(o, _)| o == "ENV")
        .flat_map(|(_, a)| a.split_whitespace().map(|kv| kv.split_once('=').expect("ENV KEY=value")).map(|(k, v)| (k.to_owned(), v.to_owned())).collect::<Vec<_>>())
        .collect()
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args} must be exec form (a JSON array) so signals reach the gateway: {e}"))
}

#[test]
fn the_image_runs_the_gateway_as_root_on_all_interfaces_with_data_in_a_volume() {
    let stage = final_stage();
    assert_eq!(exec_form(&instruction(&stage, "ENTRYPOINT")), ["omni-gateway"]);
    let env = image_env(&stage);
    assert_eq!(env["OMNI_HOST"], "0.0.0.0", "inside a container the gateway must listen on every interface");
    assert_eq!(instruction(&stage, "EXPOSE"), env["OMNI_PORT"]);
    assert_eq!(instruction(&stage, "VOLUME"), instruction(&stage, "WORKDIR"), "relative data paths resolve in WORKDIR, which must be the volume");
    assert_eq!(instruction(&stage, "STOPSIGNAL"), "SIGTERM");
    assert!(!stage.iter().any(|(o, _)| o == "USER"), "the gateway starts as root and runs PostgreSQL as PGSERVE_USER itself");
    assert!(Path::new(&env["PGSERVE_BIN_DIR"]).starts_with("/usr/lib/postgresql"), "{env:?}");
    let health = instruction(&stage, "HEALTHCHECK");
    let cmd = health.split_once("CMD ").expect("HEALTHCHECK … CMD [...]").1;
    assert_eq!(exec_form(cmd), ["omni-gateway", "healthcheck"]);
}

#[test]
fn the_images_entrypoint_as_pid_1_serves_and_its_healthcheck_follows_it_up_and_down() {
    let stage = final_stage();
    let mut env = image_env(&stage);
    // The image's paths, mapped to this machine; ports free ones.
    let dir = workdir();
    let volume = dir.path().join("var-lib-omni");
    std::fs::create_dir_all(&volume).unwrap();
    let port = free_port();
    env.insert("OMNI_PORT".into(), port.to_string());
    env.insert("PGSERVE_PORT".into(), free_port().to_string());
    assert!(!env.contains_key("OMNI_UI_DIR"), "the image serves the UI built into omni-api: no OMNI_UI_DIR");
    env.insert("PGSERVE_BIN_DIR".into(), pg_bin_dir().display().to_string());
    let entrypoint = exec_form(&instruction(&stage, "ENTRYPOINT"));
    let cmd = exec_form(&instruction(&stage, "CMD"));
    let health = instruction(&stage, "HEALTHCHECK");
    let health = exec_form(health.split_once("CMD ").unwrap().1);
    let resolve = |argv: &[String]| {
        let mut c = Command::new(bin_path(&argv[0]));
        c.args(&argv[1..]).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).envs(&env).current_dir(&volume);
        c
    };
    let healthcheck = || resolve(&health).stdin(Stdio::null()).output().unwrap();

    let mut command = Command::new("unshare");
    command.args(["--pid", "--fork", "--mount-proc"]).arg(resolve(&entrypoint).get_program()).args(&entrypoint[1..]).args(&cmd);
    command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).envs(&env).current_dir(&volume);
    command.stdout(Stdio::null()).stderr(std::fs::File::create(dir.path().join("pid1.log")).unwrap());
    let mut container = ChildGuard::spawn(&mut command);
    let log = || std::fs::read_to_string(dir.path().join("pid1.log")).unwrap_or_default();

    wait_until(Duration::from_secs(60), "the image's HEALTHCHECK command to pass", || {
        if let Some(status) = container.try_status() {
            panic!("the entrypoint exited with {status}:\n{}", log());
        }
        healthcheck().status.success().then_some(())
    });
    let gateway_pid: i32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", container.pid())).unwrap().trim().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{gateway_pid}/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")), "the entrypoint must be PID 1: {status}");
    assert!(log().contains("listening on http://0.0.0.0:"), "OMNI_HOST=0.0.0.0 must apply:\n{}", log());
    let page = Request::get("/").send_to(port);
    assert_eq!((page.status, page.body), (200, std::fs::read(repo_file("ui-dist/index.html")).unwrap()), "the UI built into omni-api");

    // The cluster is in the volume and PostgreSQL is not root.
    let data_dir = volume.join("data/postgres");
    let postgres = postgres_pids_on(&data_dir);
    assert!(!postgres.is_empty(), "PostgreSQL must run on {}", data_dir.display());
    for pid in &postgres {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = st.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(!uid.split_whitespace().skip(1).any(|u| u == "0"), "PostgreSQL must not run as root: {uid}");
    }

    unsafe { libc::kill(gateway_pid, libc::SIGTERM) };
    let exit = container.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "docker stop (SIGTERM to PID 1) must stop cleanly: {exit}\n{}", log());
    let after = healthcheck();
    assert!(!after.status.success(), "the HEALTHCHECK must fail once the gateway is gone");
    assert!(String::from_utf8_lossy(&after.stderr).contains(&port.to_string()), "{}", String::from_utf8_lossy(&after.stderr));
}
