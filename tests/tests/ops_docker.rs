//! The Docker image and the systemd unit, run for real: a Docker daemon (the
//! machine's, or one the kit starts), the image built from this build's
//! binaries on a Debian base (debootstrap when Docker Hub is unreachable),
//! containers on the host's network with free ports. Images are built once
//! per build of the binaries and shared by every test here (see
//! `omni_tests::docker`). Docker must work where these run: a missing
//! engine fails them with what to install, it never skips them.
//!
//! Gateway image: healthy with a named volume and with a bind-mounted
//! directory of another uid; a clean stop needs no crash recovery at the next
//! start; after `kill -9` acknowledged data is there; `doctor` passes inside
//! a healthy container; a second `omni-gateway run` inside it refuses and
//! leaves the live `postmaster.pid` alone, while a PostgreSQL killed inside
//! it is restarted, at once even when a backend it left behind would hold
//! its shared memory for a minute; nothing that serves runs as root; with
//! `OMNI_RESTORE_IF_EMPTY=true` a new container on an empty volume comes up
//! with the data of a previous one from the off-site repository (a `file://`
//! repository on a bind mount), and its second start does not restore again.
//!
//! systemd: the shipped unit becomes active with its status text, reloads
//! under load without a failed request, is restarted after `kill -9`, and
//! stops with `Result=success` and no process left.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use omni_tests::docker::{docker, Container, Image, Volume};
use omni_tests::{free_port, wait_until, Request, TempDir};

/// Run options every gateway container gets: the host's network (the daemon
/// may have no bridge), free ports, a stop timeout that covers a graceful
/// stop, and the image's own HEALTHCHECK command run every second instead of
/// every 30 s so tests need not wait for it.
fn gateway_args(port: u16) -> Vec<String> {
    [
        "--network",
        "host",
        "-e",
        &format!("OMNI_PORT={port}"),
        "-e",
        "PGSERVE_PORT=0",
        "--stop-timeout",
        "60",
        "--health-interval",
        "1s",
    ]
    .map(String::from)
    .to_vec()
}

/// A gateway container on a fresh named volume (or the given `-v` mount).
fn start_gateway(label: &str, mount: &str) -> (Container, u16) {
    let image = docker().image(Image::Gateway);
    let port = free_port();
    let mut args = gateway_args(port);
    args.extend(["-v".to_string(), mount.to_string(), image]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Container::run(label, &args), port)
}

fn wait_health_200(c: &Container, port: u16, timeout: Duration) {
    wait_until(timeout, &format!("GET /health on {} to answer 200", c.name), || {
        if !c.is_running() {
            panic!("{} stopped:\n{}", c.name, c.logs());
        }
        Request::get("/health").try_send(port).ok().filter(|r| r.status == 200).map(|_| ())
    });
}

const SESSION: &str = "6f1c2b7e-3d4a-4c5b-9e8f-0a1b2c3d4e5f";

fn write_preference(port: u16, key: &str, value: &str) {
    let r = Request::new("POST", "/api/v1/preferences").session(SESSION).json(&serde_json::json!({"key": key, "value": value})).send_to(port);
    assert_eq!(r.status, 200, "writing {key}: {}", r.text());
}

fn read_preference(port: u16, key: &str) -> Option<String> {
    let r = Request::get(&format!("/api/v1/preferences/{key}")).session(SESSION).send_to(port);
    (r.status == 200).then(|| r.json()["value"].as_str().unwrap_or_default().to_string())
}

fn pid_file_checksum(c: &Container) -> String {
    c.exec_ok(&["sha256sum", "/var/lib/omni/data/postgres/postmaster.pid"])
}

// ------------------------------------------------------------ gateway image

#[test]
fn with_a_named_volume_it_is_healthy_and_a_clean_stop_needs_no_recovery_at_the_next_start() {
    let volume = Volume::new("data");
    let started = Instant::now();
    let (c, port) = start_gateway("named", &format!("{}:/var/lib/omni", volume.name));
    wait_health_200(&c, port, Duration::from_secs(120));
    eprintln!("first start (initdb included): /health 200 after {:.1} s", started.elapsed().as_secs_f64());
    c.wait_healthy(Duration::from_secs(60));
    eprintln!("docker reports healthy after {:.1} s", started.elapsed().as_secs_f64());
    write_preference(port, "theme", "dark");

    let stopping = Instant::now();
    docker().run(&["stop", &c.name]);
    eprintln!("docker stop took {:.1} s", stopping.elapsed().as_secs_f64());
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "SIGTERM must stop the gateway cleanly:\n{}", c.logs());
    assert!(c.logs().contains("database system is shut down"), "PostgreSQL must have shut down cleanly:\n{}", c.logs());

    let restarted = Instant::now();
    docker().run(&["start", &c.name]);
    wait_health_200(&c, port, Duration::from_secs(60));
    eprintln!("restart: /health 200 after {:.1} s", restarted.elapsed().as_secs_f64());
    let logs = c.logs();
    for crash_recovery in ["database system was interrupted", "not properly shut down", "automatic recovery in progress"] {
        assert!(!logs.contains(crash_recovery), "a clean stop must not need crash recovery ({crash_recovery:?}):\n{logs}");
    }
    assert_eq!(read_preference(port, "theme").as_deref(), Some("dark"), "data written before the stop must be there");
}

#[test]
fn after_kill_9_the_next_start_is_healthy_with_the_acknowledged_data() {
    let volume = Volume::new("data");
    let (c, port) = start_gateway("killed", &format!("{}:/var/lib/omni", volume.name));
    wait_health_200(&c, port, Duration::from_secs(120));
    for i in 0..20 {
        write_preference(port, &format!("k{i}"), &format!("v{i}"));
    }
    docker().run(&["kill", "-s", "KILL", &c.name]);
    wait_until(Duration::from_secs(30), "the killed container to stop", || (!c.is_running()).then_some(()));

    let restarted = Instant::now();
    docker().run(&["start", &c.name]);
    wait_health_200(&c, port, Duration::from_secs(120));
    eprintln!("after kill -9: /health 200 after {:.1} s", restarted.elapsed().as_secs_f64());
    c.wait_healthy(Duration::from_secs(60));
    for i in 0..20 {
        assert_eq!(read_preference(port, &format!("k{i}")), Some(format!("v{i}")), "acknowledged write k{i} lost after kill -9");
    }
}

#[test]
fn a_bind_mounted_directory_of_another_uid_is_made_usable_on_first_start() {
    let host_dir = TempDir::new("docker-bind");
    std::os::unix::fs::chown(host_dir.path(), Some(4321), Some(4321)).unwrap();
    let (c, port) = start_gateway("bind", &format!("{}:/var/lib/omni", host_dir.path().display()));
    wait_health_200(&c, port, Duration::from_secs(120));
    write_preference(port, "bind", "yes");
    let owner = c.exec_ok(&["stat", "-c", "%U %a", "/var/lib/omni/data/postgres"]);
    assert_eq!(owner, "postgres 700", "the cluster must belong to PostgreSQL's account, mode 700");
}

#[test]
fn a_bind_mounted_directory_postgres_cannot_traverse_is_refused_with_the_fix() {
    // Mode 700 of another uid: root in the container may enter, PostgreSQL's
    // account may not. Changing the modes of the operator's own directory is
    // not the gateway's call; it stops and says what to run.
    let host_dir = TempDir::new("docker-bind700");
    std::os::unix::fs::chown(host_dir.path(), Some(4321), Some(4321)).unwrap();
    std::fs::set_permissions(host_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let (c, _port) = start_gateway("bind700", &format!("{}:/var/lib/omni", host_dir.path().display()));
    wait_until(Duration::from_secs(60), "the gateway to stop", || (!c.is_running()).then_some(()));
    assert_ne!(c.inspect("{{.State.ExitCode}}"), "0");
    let logs = c.logs();
    // The worker's backup directory or PostgreSQL's cluster, whichever is checked first.
    assert!(logs.contains("cannot reach /var/lib/omni/data/") && logs.contains("chmod o+x /var/lib/omni"), "{logs}");
}

#[test]
fn doctor_inside_a_healthy_container_describes_it_and_exits_zero() {
    let volume = Volume::new("data");
    let (c, port) = start_gateway("doctor", &format!("{}:/var/lib/omni", volume.name));
    wait_health_200(&c, port, Duration::from_secs(120));
    let out = c.exec(&["omni-gateway", "doctor"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "doctor must exit 0 on a healthy container:\n{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!table.contains("FAIL"), "{table}");
    let row = |name: &str| table.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} row:\n{table}")).to_string();
    assert!(row("OMNI_PORT").contains("in use by the running gateway (pid 1)"), "{table}");
    assert!(row("postmaster.pid").contains("of the running gateway (pid 1)"), "{table}");
    assert!(table.contains("is running and healthy"), "{table}");
}

#[test]
fn a_second_gateway_run_inside_the_container_refuses_and_leaves_the_live_pid_file_alone() {
    let volume = Volume::new("data");
    let (c, port) = start_gateway("second", &format!("{}:/var/lib/omni", volume.name));
    wait_health_200(&c, port, Duration::from_secs(120));
    let before = pid_file_checksum(&c);
    let postgres_before = Request::get("/gateway/status").send_to(port).json()["components"][0]["pid"].clone();

    let other_port = free_port().to_string();
    let out = c.exec(&["env", &format!("OMNI_PORT={other_port}"), "omni-gateway", "run"]);
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a second gateway on the live data directory must refuse:\n{log}");
    assert!(log.contains("a gateway (pid 1) holds its lock") && log.contains("nothing was done"), "the refusal must say why:\n{log}");
    assert!(!log.contains("removing stale"), "{log}");

    assert_eq!(pid_file_checksum(&c), before, "the live postmaster.pid must be untouched");
    assert_eq!(Request::get("/health").send_to(port).status, 200, "the running instance must keep serving");
    assert_eq!(Request::get("/gateway/status").send_to(port).json()["components"][0]["pid"], postgres_before, "its PostgreSQL must not have restarted");
    write_preference(port, "after", "second-run");
}

#[test]
fn a_postgres_killed_inside_the_container_is_restarted_without_ptrace_rights() {
    // The gateway (root without CAP_SYS_PTRACE or CAP_IPC_OWNER) must judge
    // the dead postmaster's pid file stale and restart it, not refuse.
    let volume = Volume::new("data");
    let (c, port, old) = healthy_with_a_preference("pgkill", &volume);
    c.exec_ok(&["kill", "-9", &old.to_string()]);
    let took = wait_postgres_replaced(&c, port, old, Duration::from_secs(60));
    eprintln!("postgres killed in the container: ready again after {:.1} s", took.as_secs_f64());
    assert!(!c.logs().contains("may belong to a running PostgreSQL"), "{}", c.logs());
    assert_eq!(read_preference(port, "before").as_deref(), Some("pgkill"));
}

/// A gateway container on `volume`, healthy, with the preference `before`
/// written; and its PostgreSQL's pid.
fn healthy_with_a_preference(label: &str, volume: &Volume) -> (Container, u16, i64) {
    let (c, port) = start_gateway(label, &format!("{}:/var/lib/omni", volume.name));
    wait_health_200(&c, port, Duration::from_secs(120));
    write_preference(port, "before", label);
    let pid = Request::get("/gateway/status").send_to(port).json()["components"][0]["pid"].as_i64().expect("postgres pid");
    (c, port, pid)
}

/// Waits (up to `within`) for a PostgreSQL other than `old` to be ready and
/// the gateway healthy; how long the new one took to be ready.
fn wait_postgres_replaced(c: &Container, port: u16, old: i64, within: Duration) -> Duration {
    let since = Instant::now();
    wait_until(within, "PostgreSQL to be restarted and ready", || {
        let now = Request::get("/gateway/status").send_to(port).json()["components"][0].clone();
        (now["state"] == "ready" && now["pid"].as_i64().is_some_and(|p| p != old)).then_some(())
    });
    let took = since.elapsed();
    wait_health_200(c, port, Duration::from_secs(30));
    took
}

#[test]
fn a_backend_a_killed_postgres_left_asking_for_a_checkpoint_is_ended_and_postgres_restarts_without_waiting_for_it() {
    // A backend that asks for a checkpoint after its postmaster died (the
    // first base backup's `--checkpoint=fast`, here a `CHECKPOINT` after a
    // busy loop, which never looks for the postmaster) retries its signal to
    // the dead checkpointer for a minute, holding the shared memory: a new
    // postmaster is refused until it is gone. The gateway, PID 1 without
    // CAP_SYS_PTRACE, cannot read its working directory; it ends it as an
    // orphan it adopted, of the account that owns the data directory.
    let volume = Volume::new("data");
    let (c, port, old) = healthy_with_a_preference("pgorphan", &volume);
    let pg_port = c.exec_ok(&["sed", "-n", "4p", "/var/lib/omni/data/postgres/postmaster.pid"]);
    let sql = "DO $$ BEGIN PERFORM count(*) FROM generate_series(1, 20000000); END $$; CHECKPOINT";
    c.exec_ok(&[
        "sh",
        "-c",
        &format!("PGPASSWORD=\"$(cat /var/lib/omni/data/postgres.password)\" setsid psql -h 127.0.0.1 -p {pg_port} -U postgres -d postgres -c '{sql}' >/dev/null 2>&1 &"),
    ]);
    wait_until(Duration::from_secs(30), "the busy backend to run", || c.exec_ok(&["ps", "-eo", "args"]).lines().any(|l| l.starts_with("postgres:") && l.ends_with(" DO")).then_some(()));
    c.exec_ok(&["kill", "-9", &old.to_string()]);
    // The orphan's own limit is 60 s after its CHECKPOINT began.
    let took = wait_postgres_replaced(&c, port, old, Duration::from_secs(40));
    eprintln!("postgres killed beside a backend asking for a checkpoint: ready again after {:.1} s", took.as_secs_f64());
    let logs = c.logs();
    assert!(logs.contains("left server processes running") && logs.contains("they can never serve again"), "the orphan must be ended, and said so:\n{logs}");
    assert_eq!(read_preference(port, "before").as_deref(), Some("pgorphan"));
}

#[test]
fn inside_the_container_neither_the_worker_nor_postgres_runs_as_root() {
    let volume = Volume::new("data");
    let (c, port) = start_gateway("users", &format!("{}:/var/lib/omni", volume.name));
    wait_health_200(&c, port, Duration::from_secs(120));
    let ps = c.exec_ok(&["ps", "-eo", "user:20,pid,comm"]);
    let running = |comm: &str| ps.lines().filter(|l| l.split_whitespace().nth(2) == Some(comm)).map(str::to_string).collect::<Vec<_>>();
    assert!(!running("postgres").is_empty() && !running("omni-api").is_empty(), "{ps}");
    assert!(ps.lines().any(|l| l.starts_with("root ") && l.split_whitespace().nth(1) == Some("1")), "the gateway is PID 1 (as root, to hand out the volume):\n{ps}");
    for comm in ["postgres", "omni-api"] {
        let as_root: Vec<String> = running(comm).into_iter().filter(|l| l.starts_with("root ")).collect();
        assert!(as_root.is_empty(), "{comm} must not run as root:\n{ps}");
    }
}

/// The manifests of base backups under `root` (a `file://` repository's directory).
fn manifests_under(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    crate::gateway::files_under(root)
        .into_iter()
        .filter(|path| path.file_name().is_some_and(|n| n == "manifest.json") && path.parent().and_then(|p| p.parent()).is_some_and(|p| p.ends_with("base")))
        .collect()
}

#[test]
fn with_omni_restore_if_empty_a_new_container_on_an_empty_volume_comes_up_with_the_data_from_the_repository_once() {
    // The repository: a directory of the host, bind-mounted into each container.
    let repository = TempDir::new("docker-repository");
    let mount = format!("{}:/repository", repository.path().display());
    let url = "file:///repository/offsite";
    let image = docker().image(Image::Gateway);
    let run = |label: &str, volume: &Volume, extra: &[&str]| {
        let port = free_port();
        let mut args = gateway_args(port);
        args.extend(["-v", &format!("{}:/var/lib/omni", volume.name), "-v", &mount, "-e", &format!("OMNI_REPOSITORY_URL={url}"), "-e", "OMNI_REPOSITORY_WAL_INTERVAL=1s"].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(image.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (Container::run(label, &args), port)
    };

    // The first host: data written, its base backup and WAL shipped, then gone.
    let first_volume = Volume::new("first");
    let (first, first_port) = run("first", &first_volume, &[]);
    wait_health_200(&first, first_port, Duration::from_secs(120));
    wait_until(Duration::from_secs(180), "a base backup's manifest.json in the repository", || {
        if !first.is_running() {
            panic!("{} stopped:\n{}", first.name, first.logs());
        }
        (!manifests_under(repository.path()).is_empty()).then_some(())
    });
    for i in 0..10 {
        write_preference(first_port, &format!("shipped{i}"), &format!("v{i}"));
    }
    // A clean stop ships the last WAL after PostgreSQL stopped.
    docker().run(&["stop", &first.name]);
    assert_eq!(first.inspect("{{.State.ExitCode}}"), "0", "{}", first.logs());
    drop(first);
    drop(first_volume);

    // A new container on an empty volume, with the repository's URL.
    let volume = Volume::new("restored");
    let started = Instant::now();
    let (c, port) = run("restored", &volume, &["-e", "OMNI_RESTORE_IF_EMPTY=true"]);
    wait_health_200(&c, port, Duration::from_secs(300));
    eprintln!("a new container restored from the repository: /health 200 after {:.1} s", started.elapsed().as_secs_f64());
    for i in 0..10 {
        assert_eq!(read_preference(port, &format!("shipped{i}")), Some(format!("v{i}")), "shipped{i} is back\n{}", c.logs());
    }
    let restoring = "holds base backups: restoring latest";
    assert_eq!(c.logs().matches(restoring).count(), 1, "the start says it restores:\n{}", c.logs());
    write_preference(port, "after-the-restore", "kept");

    // A second start on the now non-empty volume does not restore again.
    docker().run(&["stop", &c.name]);
    docker().run(&["start", &c.name]);
    wait_health_200(&c, port, Duration::from_secs(120));
    let logs = c.logs();
    assert_eq!(logs.matches(restoring).count(), 1, "the second start restored again:\n{logs}");
    assert_eq!(read_preference(port, "after-the-restore").as_deref(), Some("kept"), "the second start serves the volume as it was");
    assert_eq!(read_preference(port, "shipped0").as_deref(), Some("v0"));
}

// ------------------------------------------------------------ systemd unit

/// A container running systemd with the unit installed, configured through
/// `/etc/omni/omni.env` as an operator would.
struct SystemdMachine {
    c: Container,
    port: u16,
    _env: TempDir,
}

impl SystemdMachine {
    fn start() -> SystemdMachine {
        let image = docker().image(Image::Systemd);
        let port = free_port();
        let env = TempDir::new("omni-env");
        let env_file = env.path().join("omni.env");
        std::fs::write(&env_file, format!("OMNI_PORT={port}\nPGSERVE_PORT=0\n")).unwrap();
        let mount = format!("{}:/etc/omni/omni.env:ro", env_file.display());
        let c = Container::run(
            "systemd",
            &[
                "--network",
                "host",
                "--cap-add",
                "SYS_ADMIN",
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
                "-v",
                "/sys/fs/cgroup:/sys/fs/cgroup:ro",
                "-v",
                &mount,
                &image,
            ],
        );
        SystemdMachine { c, port, _env: env }
    }

    fn show(&self, property: &str) -> String {
        self.c.exec_ok(&["systemctl", "show", "-p", property, "--value", "omni-gateway.service"])
    }

    fn journal(&self) -> String {
        let out = self.c.exec(&["journalctl", "-u", "omni-gateway.service", "--no-pager", "-n", "200"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_state(&self, active: &str, sub: &str, timeout: Duration) {
        wait_until(timeout, &format!("omni-gateway.service to be {active} ({sub})"), || {
            let state = self.c.exec(&["systemctl", "show", "-p", "ActiveState", "-p", "SubState", "omni-gateway.service"]);
            let text = String::from_utf8_lossy(&state.stdout);
            if text.contains("ActiveState=failed") {
                panic!("the unit failed:\n{}", self.journal());
            }
            (text.contains(&format!("ActiveState={active}")) && text.contains(&format!("SubState={sub}"))).then_some(())
        });
    }
}

#[test]
fn the_unit_under_systemd_runs_reloads_without_failures_restarts_after_kill_and_stops_cleanly() {
    let m = SystemdMachine::start();
    let started = Instant::now();
    m.wait_state("active", "running", Duration::from_secs(120));
    eprintln!("systemd: active (running) {:.1} s after the container started", started.elapsed().as_secs_f64());
    assert_eq!(Request::get("/health").send_to(m.port).status, 200, "READY=1 must mean usable");
    let status_text = m.show("StatusText");
    assert!(!status_text.is_empty(), "the gateway must send STATUS= text:\n{}", m.journal());
    eprintln!("systemd: StatusText={status_text}");
    assert_eq!(m.show("User"), "omni");

    // Reload under load: SIGHUP through ExecReload replaces the worker.
    let api_pid = |port: u16| Request::get("/gateway/status").send_to(port).json()["components"][1]["pid"].clone();
    let old_worker = api_pid(m.port);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, port) = (stop.clone(), ok.clone(), failed.clone(), m.port);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match Request::get("/api/v1/health").try_send(port) {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(10), "load to flow", || (ok.load(Ordering::Relaxed) > 50).then_some(()));
    m.c.exec_ok(&["systemctl", "reload", "omni-gateway.service"]);
    wait_until(Duration::from_secs(60), "a new worker after the reload", || {
        let now = api_pid(m.port);
        (now != old_worker && !now.is_null()).then_some(())
    });
    let at_switch = ok.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "load to flow after the reload", || (ok.load(Ordering::Relaxed) > at_switch + 50).then_some(()));
    stop.store(true, Ordering::Relaxed);
    load.into_iter().for_each(|t| t.join().unwrap());
    eprintln!("systemd reload: {} requests, {} failed", ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed.load(Ordering::Relaxed), 0, "systemctl reload must not fail a request");
    m.wait_state("active", "running", Duration::from_secs(10));

    // kill -9 of the main process: Restart=on-failure brings it back, healthy.
    let main_pid = m.show("MainPID");
    let restarts = m.show("NRestarts");
    m.c.exec_ok(&["kill", "-9", &main_pid]);
    wait_until(Duration::from_secs(120), "systemd to restart the gateway", || {
        let pid = m.show("MainPID");
        (pid != main_pid && pid != "0" && m.show("NRestarts") != restarts).then_some(())
    });
    m.wait_state("active", "running", Duration::from_secs(120));
    wait_until(Duration::from_secs(60), "/health 200 after the restart", || {
        Request::get("/health").try_send(m.port).ok().filter(|r| r.status == 200).map(|_| ())
    });

    // systemctl stop: a clean exit, nothing left in the unit's cgroup.
    let stopping = Instant::now();
    m.c.exec_ok(&["systemctl", "stop", "omni-gateway.service"]);
    eprintln!("systemctl stop took {:.1} s", stopping.elapsed().as_secs_f64());
    assert_eq!(m.show("Result"), "success", "{}", m.journal());
    assert_eq!(m.show("ActiveState"), "inactive");
    let left = m.c.exec(&["pgrep", "-u", "omni"]);
    assert!(!left.status.success(), "processes of the unit left after stop: {}", String::from_utf8_lossy(&left.stdout));
    assert!(m.journal().contains("database system is shut down"), "PostgreSQL must shut down cleanly:\n{}", m.journal());
}
