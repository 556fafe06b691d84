//! Several gateways on one PostgreSQL behind Debian's nginx (issue 16):
//! three real gateways with `DATABASE_URL` pointing at one `TempPostgres`
//! cluster started here, and nginx running `deploy/nginx-lb.conf` itself
//! (only its ports replaced).
//!
//! * Load through nginx while one gateway is stopped (SIGTERM: `/health`
//!   turns 503 first, then it drains) and another is killed (`kill -9`):
//!   no idempotent request fails, no acknowledged write is lost.
//! * Scheduled backups every 2 s across the three: only the leader (the
//!   worker whose dedicated session holds the advisory lock) makes them,
//!   once per interval; after `kill -9` of the leader another leads within
//!   5 s and the schedule goes on; retention deletes each old backup once.
//! * A preference written through one gateway is read through another; a
//!   restore through one is seen through all, and two restores at once on
//!   two gateways are refused one at a time.
//! * With `OMNI_TRUSTED_PROXIES` naming nginx, clients at distinct real
//!   source addresses (127.0.0.x) are told apart: one client's 50 wrong
//!   sign-ins block only that client, never another client's sign-in nor
//!   any API-key request; what a client writes in `X-Forwarded-For` itself
//!   buys it nothing, through nginx or directly.

use crate::gateway;
use crate::source;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{free_port, wait_until, ChildGuard, Request, TempDir, TempPostgres, TEST_API_KEY};
use serde_json::json;

// ---------------------------------------------------------------- nginx

/// Debian's nginx, run as a child with its own prefix and configuration in
/// a temporary directory; stopped (with its workers) on drop.
struct Nginx {
    child: ChildGuard,
    port: u16,
    dir: TempDir,
}

impl Nginx {
    /// nginx in front of the gateways on `ports`, with `deploy/nginx-lb.conf`.
    fn start(ports: &[u16; 3]) -> Nginx {
        let dir = TempDir::new("nginx");
        for attempt in 1.. {
            // nginx cannot listen on port 0 and tell us the port, so one is
            // picked by binding and releasing it just before the start; if
            // something takes it in between, nginx fails with "Address
            // already in use" and is started again on another.
            let port = free_port();
            let conf = write_config(dir.path(), port, ports);
            let log = dir.path().join("stderr.log");
            let mut command = std::process::Command::new("nginx");
            command
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .stdin(std::process::Stdio::null())
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(&log).unwrap());
            let mut child = ChildGuard::spawn(&mut command);
            let started = wait_until(Duration::from_secs(10), "nginx to listen", || {
                if let Some(status) = child.try_status() {
                    return Some(Err(status));
                }
                std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| Ok(()))
            });
            match started {
                Ok(()) => return Nginx { child, port, dir },
                Err(status) => {
                    let errors = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default() + &std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(attempt < 3 && errors.contains("Address already in use"), "nginx exited ({status}):\n{errors}");
                }
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT would wait for open connections; SIGTERM is nginx's fast stop.
        self.child.terminate(Duration::from_secs(5));
    }
}

/// The shipped configuration with its ports replaced, included from a main
/// file that keeps every path inside `dir`.
fn write_config(dir: &Path, listen: u16, gateways: &[u16; 3]) -> PathBuf {
    let shipped_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx-lb.conf");
    let mut site = std::fs::read_to_string(&shipped_path).expect("deploy/nginx-lb.conf");
    for (shipped, port) in [8882, 8883, 8884].iter().zip(gateways) {
        let from = format!("server 127.0.0.1:{shipped} ");
        assert_eq!(site.matches(&from).count(), 1, "deploy/nginx-lb.conf names the gateway {from:?} once");
        site = site.replace(&from, &format!("server 127.0.0.1:{port} "));
    }
    assert_eq!(site.matches("listen 8080;").count(), 1, "deploy/nginx-lb.conf listens on 8080 once");
    site = site.replace("listen 8080;", &format!("listen 127.0.0.1:{listen};"));
    std::fs::write(dir.join("nginx-lb.conf"), site).unwrap();
    let d = dir.display();
    // Running as root, nginx's workers would switch to `nobody`, who cannot
    // write into this root-owned directory.
    let user = if unsafe { libc::geteuid() } == 0 { "user root;" } else { "" };
    let main = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\n{user}\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/nginx-lb.conf;\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, main).unwrap();
    path
}

// ---------------------------------------------------------------- gateways

/// One gateway on the shared database, without an embedded PostgreSQL.
fn gateway_on(pg: &TempPostgres, dir: &Path, backup_dir: &Path, extra: &[(&str, &str)]) -> Gateway {
    let mut builder = GatewayBuilder::new(dir)
        .env("DATABASE_URL", pg.url())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_BACKUP_DIR", backup_dir.display().to_string());
    for (name, value) in extra {
        builder = builder.env(name, *value);
    }
    builder.start()
}

/// The gateway's view of whether its worker leads (`None`: not said yet).
fn leads(gw: &Gateway) -> Option<bool> {
    Request::get("/gateway/status").try_send(gw.port).ok().and_then(|r| {
        let doc = r.json();
        doc["components"].as_array()?.iter().find(|c| c["name"] == "api")?["leader"].as_bool()
    })
}

/// Waits until exactly one of `gateways` says its worker leads, and returns its index.
fn the_leader(gateways: &[&Gateway], timeout: Duration) -> usize {
    wait_until(timeout, "exactly one gateway to lead", || {
        let views: Vec<Option<bool>> = gateways.iter().map(|g| leads(g)).collect();
        let leaders: Vec<usize> = views.iter().enumerate().filter(|(_, v)| **v == Some(true)).map(|(i, _)| i).collect();
        (leaders.len() == 1 && views.iter().all(Option::is_some)).then(|| leaders[0])
    })
}

fn put(port: u16, session: &str, key: &str, value: &str) -> std::io::Result<omni_tests::Response> {
    Request::new("POST", "/api/v1/preferences").session(session).json(&json!({"key": key, "value": value})).try_send(port)
}

fn read(port: u16, session: &str, key: &str) -> omni_tests::Response {
    Request::get(&format!("/api/v1/preferences/{key}")).session(session).send_to(port)
}

/// `(file, time)` of every line of `log` containing `what`, by the backup file it names.
fn backup_lines(log: &str, what: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let at = l.find("omni_backup_")?;
            let name = &l[at..];
            let end = name.find(".sql")? + 4;
            Some(name[..end].to_owned())
        })
        .collect()
}

/// Seconds since the epoch of `omni_backup_YYYYMMDD_HHMMSS.sql` (UTC).
fn backup_second(name: &str) -> i64 {
    let digits: String = name.chars().filter(char::is_ascii_digit).collect();
    let n = |r: std::ops::Range<usize>| digits[r].parse::<i64>().unwrap();
    let (y, mo, d, h, mi, s) = (n(0..4), n(4..6), n(6..8), n(8..10), n(10..12), n(12..14));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + h * 3600 + mi * 60 + s
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

// ---------------------------------------------------------------- tests

#[test]
fn load_through_nginx_loses_nothing_while_one_gateway_drains_and_another_is_killed() {
    let pg = TempPostgres::start_new();
    let backups = TempDir::new("lb-backups");
    let dirs: Vec<TempDir> = (0..3).map(|_| workdir()).collect();
    let mut gws: Vec<Gateway> = dirs.iter().map(|d| gateway_on(&pg, d.path(), backups.path(), &[])).collect();
    let nginx = Nginx::start(&[gws[0].port, gws[1].port, gws[2].port]);
    let lb = nginx.port;
    assert_eq!(Request::get("/health").send_to(lb).status, 200, "{}", nginx.error_log());

    // Mixed load: each client reads its preferences (idempotent GET) and
    // writes new ones (POST), through nginx.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed_reads = Arc::new(Mutex::new(Vec::<String>::new()));
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let refused_writes = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, done, failed_reads, acknowledged, refused_writes) =
                (stop.clone(), done.clone(), failed_reads.clone(), acknowledged.clone(), refused_writes.clone());
            std::thread::spawn(move || {
                let session = uuid::Uuid::new_v4().to_string();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("k{c}-{n}");
                    match put(lb, &session, &key, "v") {
                        Ok(r) if r.status == 200 => acknowledged.lock().unwrap().push((session.clone(), key)),
                        // Not acknowledged: the client knows it was not stored
                        // (nginx does not retry a POST that reached a gateway).
                        _ => {
                            refused_writes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    match Request::get("/api/v1/preferences").session(&session).try_send(lb) {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failed_reads.lock().unwrap().push(format!("GET {} {}", r.status, r.text())),
                        Err(e) => failed_reads.lock().unwrap().push(format!("GET: {e}")),
                    }
                    done.fetch_add(2, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let requests_by = |n: u64, what: &str| {
        let target = done.load(Ordering::Relaxed) + n;
        wait_until(Duration::from_secs(60), what, || (done.load(Ordering::Relaxed) >= target).then_some(()));
    };
    requests_by(200, "200 requests through nginx before anything is stopped");

    // SIGTERM to the first gateway while it has a request in flight (a POST
    // whose body is not all sent yet): /health turns 503 at once, the request
    // still completes (the drain), then the gateway exits 0.
    use std::io::{Read, Write};
    let in_flight_session = uuid::Uuid::new_v4().to_string();
    let body = json!({"key": "in-flight", "value": "drained"}).to_string();
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", gws[0].port)).unwrap();
    write!(
        slow,
        "POST /api/v1/preferences HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-type: application/json\r\nx-session-id: {in_flight_session}\r\ncontent-length: {}\r\n\r\n{}",
        body.len(),
        &body[..5]
    )
    .unwrap();
    // A request answered after ours was sent: the gateway has accepted our connection.
    assert_eq!(gws[0].get("/health").status, 200);
    // SAFETY: signalling the gateway process this test started.
    unsafe { libc::kill(gws[0].child.pid() as i32, libc::SIGTERM) };
    let draining = gws[0].port;
    let health = wait_until(Duration::from_secs(5), "the stopping gateway's /health to answer 503", || {
        Request::get("/health").try_send(draining).ok().filter(|r| r.status == 503)
    });
    assert_eq!(health.json()["gateway"]["state"], "stopping", "{}", health.text());
    slow.write_all(body[5..].as_bytes()).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "the request in flight at SIGTERM completes: {answer}");
    acknowledged.lock().unwrap().push((in_flight_session, "in-flight".to_owned()));
    let status = gws[0].child.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "the stopped gateway exits 0 after its drain: {status}\n{}", gws[0].log());
    requests_by(200, "200 requests after the first gateway stopped");

    // kill -9 of the second one (its worker dies with it, by its parent-death signal).
    gws[1].child.kill9();
    let killed_at = Instant::now();
    // Load goes on for a while with only the third gateway left (and both
    // others retried by nginx after their fail_timeout).
    let target = done.load(Ordering::Relaxed) + 400;
    wait_until(Duration::from_secs(60), "400 requests and 6 s of load after the second gateway was killed", || {
        (done.load(Ordering::Relaxed) >= target && killed_at.elapsed() >= Duration::from_secs(6)).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }

    let failed_reads = failed_reads.lock().unwrap().clone();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let total = done.load(Ordering::Relaxed);
    eprintln!(
        "{total} requests through nginx: {} reads failed, {} writes acknowledged, {} writes not acknowledged; load ran {:.1} s past the kill",
        failed_reads.len(),
        acknowledged.len(),
        refused_writes.load(Ordering::Relaxed),
        killed_at.elapsed().as_secs_f64()
    );
    assert!(failed_reads.is_empty(), "idempotent requests failed through nginx: {failed_reads:?}\n{}", nginx.error_log());
    let stored: BTreeSet<(String, String)> = pg
        .client()
        .query("SELECT session_id::text, key FROM omni_user_preferences", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let lost: Vec<_> = acknowledged.iter().filter(|w| !stored.contains(*w)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes are not in the database: {lost:?}", lost.len());
    assert!(acknowledged.len() > 100, "the load wrote too little to mean anything: {}", acknowledged.len());
    // The survivor still serves.
    assert_eq!(gws[2].get("/health").status, 200);
}

/// The schedule counts each interval from the newest backup: after a backup
/// named at second `t` (its completion, in whole seconds), the next is due at
/// `t + 2 s`. "Each interval backed up exactly once" is checked on the names
/// of every scheduled backup any gateway logged: consecutive ones are at
/// least 2 s apart (never two in one interval) and at most 2 s plus
/// [`SLACK_S`] apart (none skipped; the slack is a dump's time plus the
/// schedule's wake-up on this shared, busy machine), except across the
/// leader's death, where the gap may also hold the takeover (under 5 s).
const SLACK_S: i64 = 3;

#[test]
fn scheduled_backups_run_once_per_interval_on_the_leader_and_survive_its_death() {
    let pg = TempPostgres::start_new();
    let backups = TempDir::new("lb-scheduled");
    let dirs: Vec<TempDir> = (0..3).map(|_| workdir()).collect();
    let schedule = [("OMNI_BACKUP_INTERVAL", "2s"), ("OMNI_BACKUP_KEEP", "4")];
    let mut gws: Vec<Gateway> = dirs.iter().map(|d| gateway_on(&pg, d.path(), backups.path(), &schedule)).collect();
    let started = Instant::now();
    let leader = the_leader(&gws.iter().collect::<Vec<_>>(), Duration::from_secs(20));
    eprintln!("gateway {leader} leads ({:.1} s after the third started)", started.elapsed().as_secs_f64());

    // Every backup named, from the line the backup module writes once per
    // file (the schedule's own line could be cut off by a stop right after).
    let scheduled = |gw: &Gateway| {
        let log = gw.log();
        let named: String = log.lines().filter(|l| !l.contains("scheduled backup written")).collect::<Vec<_>>().join("\n");
        backup_lines(&named, "backup written")
    };
    wait_until(Duration::from_secs(30), "five scheduled backups on the leader", || (scheduled(&gws[leader]).len() >= 5).then_some(()));
    let before_kill = scheduled(&gws[leader]);
    gws[leader].child.kill9();
    let killed = Instant::now();
    let killed_s = now_s();
    let rest: Vec<&Gateway> = gws.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, g)| g).collect();
    let next = wait_until(Duration::from_secs(5), "another gateway to lead within 5 s of kill -9", || {
        rest.iter().position(|g| leads(g) == Some(true))
    });
    let takeover = killed.elapsed();
    eprintln!("leadership passed {} ms after kill -9 of the leader", takeover.as_millis());
    // 20 s of schedule in all, at least five intervals of it after the kill.
    wait_until(Duration::from_secs(40), "five scheduled backups on the new leader, 20 s of schedule in all", || {
        (scheduled(rest[next]).len() >= 5 && started.elapsed() >= Duration::from_secs(20)).then_some(())
    });
    let ran = started.elapsed();
    // Stop the survivors, so the directory no longer changes.
    for (i, gw) in gws.iter_mut().enumerate() {
        if i != leader {
            assert!(gw.terminate().success(), "{}", gw.log());
        }
    }

    // Who made which backup: the old leader before the kill, the new one after, nobody else.
    let mut by_gateway: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        for name in scheduled(gw) {
            assert!(by_gateway.insert(name.clone(), i).is_none(), "{name} was logged as written twice");
            all.push(name);
        }
    }
    all.sort();
    let new_leader = (0..gws.len()).filter(|i| *i != leader).nth(next).unwrap();
    assert!(all.iter().all(|n| by_gateway[n] == leader || by_gateway[n] == new_leader), "only the two leaders made scheduled backups: {by_gateway:?}");
    assert!(before_kill.iter().all(|n| by_gateway[n] == leader));
    eprintln!("{} scheduled backups in {:.1} s: {all:?}", all.len(), ran.as_secs_f64());

    let seconds: Vec<i64> = all.iter().map(|n| backup_second(n)).collect();
    for (pair, names) in seconds.windows(2).zip(all.windows(2)) {
        let gap = pair[1] - pair[0];
        let across_the_kill = (pair[0] as f64) <= killed_s + 1.0 && (pair[1] as f64) >= killed_s - 1.0;
        let most = if across_the_kill { 2 + 5 + SLACK_S } else { 2 + SLACK_S };
        assert!(gap >= 2, "two backups in one interval: {names:?}");
        assert!(gap <= most, "an interval was skipped: {names:?} are {gap} s apart (at most {most} s allowed)");
    }

    // Retention: each old backup deleted exactly once, by whoever led, and
    // the newest four kept.
    let mut deleted: Vec<String> = gws.iter().flat_map(|g| backup_lines(&g.log(), "retention: deleted an old backup")).collect();
    let deletions = deleted.len();
    deleted.sort();
    deleted.dedup();
    assert_eq!(deleted.len(), deletions, "a backup was deleted twice");
    let left: BTreeSet<String> = std::fs::read_dir(backups.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    assert_eq!(left, all.iter().rev().take(4).cloned().collect::<BTreeSet<_>>(), "the newest four are kept");
    // Every older one is gone. (Its log line may not be: the lines a
    // gateway had not yet copied from its worker die with it at kill -9.)
    assert!(deleted.iter().all(|d| all[..all.len() - 4].contains(d)), "only older backups were deleted: {deleted:?}");
    let races: Vec<String> = gws.iter().flat_map(|g| g.log().lines().filter(|l| l.contains("retention: could not delete")).map(str::to_owned).collect::<Vec<_>>()).collect();
    assert!(races.is_empty(), "retention ran on two gateways at once: {races:?}");
}

#[test]
fn a_preference_and_a_restore_are_seen_through_every_gateway() {
    let pg = TempPostgres::start_new();
    // Each gateway its own backup directory, as on separate machines.
    let dirs: Vec<TempDir> = (0..3).map(|_| workdir()).collect();
    let backup_dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("lb-own-backups")).collect();
    let gws: Vec<Gateway> = dirs.iter().zip(&backup_dirs).map(|(d, b)| gateway_on(&pg, d.path(), b.path(), &[])).collect();
    let session = uuid::Uuid::new_v4().to_string();

    let stored = put(gws[0].port, &session, "theme", "dark").unwrap();
    assert_eq!(stored.status, 200, "{}", stored.text());
    for gw in &gws[1..] {
        assert_eq!(read(gw.port, &session, "theme").json(), json!({"key": "theme", "value": "dark"}), "read through another gateway");
    }

    // A backup through the first gateway, a change through the second.
    let created = Request::new("POST", "/api/v1/backup/create").api_key().send_to(gws[0].port);
    assert_eq!(created.status, 200, "{}", created.text());
    let file = created.json()["backup_file"].as_str().unwrap().to_owned();
    assert_eq!(put(gws[1].port, &session, "theme", "light").unwrap().status, 200);
    for gw in &gws {
        assert_eq!(read(gw.port, &session, "theme").json()["value"], "light");
    }
    // The backup (and its checksum) copied to the other machines' directories.
    for other in &backup_dirs[1..] {
        for name in [file.clone(), format!("{file}.sha256")] {
            std::fs::copy(backup_dirs[0].path().join(&name), other.path().join(&name)).unwrap();
            // Given to the worker's account, which owns its directory (run as root, not root).
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::metadata(other.path()).unwrap();
            std::os::unix::fs::chown(other.path().join(&name), Some(owner.uid()), Some(owner.gid())).unwrap();
        }
    }

    // Two restores at once, on two gateways with separate directories: the
    // database's lock lets one run and refuses the other at once.
    let barrier = Arc::new(Barrier::new(2));
    let racers: Vec<_> = [gws[1].port, gws[2].port]
        .into_iter()
        .map(|port| {
            let (barrier, file) = (barrier.clone(), file.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Request::new("POST", &format!("/api/v1/backup/restore/{file}")).api_key().send_to(port)
            })
        })
        .collect();
    let answers: Vec<omni_tests::Response> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    statuses.sort();
    let restore_lines = || gws.iter().flat_map(|g| g.log().lines().filter(|l| l.contains("restor") || l.contains("backup")).map(str::to_owned).collect::<Vec<_>>()).collect::<Vec<_>>();
    assert_eq!(statuses, [200, 409], "one restore runs, the other is refused: {:?}\n{:#?}", answers.iter().map(|r| r.text()).collect::<Vec<_>>(), restore_lines());
    let refused = answers.iter().find(|r| r.status == 409).unwrap().json();
    assert_eq!(refused["code"], "backup_busy", "{refused}");

    // Seen through every gateway, and each worker reset its pool on the notice.
    for gw in &gws {
        assert_eq!(read(gw.port, &session, "theme").json()["value"], "dark", "the restored value through gateway {}", gw.port);
        wait_until(Duration::from_secs(10), "every worker to hear of the restore", || {
            gw.log().contains("a restore finished on the database").then_some(())
        });
    }
    // And the pool reset leaves every gateway able to write.
    for (i, gw) in gws.iter().enumerate() {
        assert_eq!(put(gw.port, &session, &format!("after-{i}"), "ok").unwrap().status, 200, "{}", gw.log());
    }
}

#[test]
fn behind_nginx_one_clients_wrong_sign_ins_block_only_that_client() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_TRUSTED_PROXIES", "127.0.0.1/32").start();
    // One gateway behind the shipped configuration (named three times).
    let nginx = Nginx::start(&[gw.port; 3]);
    let lb = nginx.port;
    let admin = json!({"username": "admin", "password": "correct horse battery"});
    // OMNI_API_KEY is set, so the install counts as set up: accounts are made with the key.
    let mut admin_account = admin.clone();
    admin_account["role"] = json!("admin");
    let created = Request::new("POST", "/api/v1/accounts").api_key().json(&admin_account).send_to(lb);
    assert_eq!(created.status, 201, "{}", created.text());
    let made = Request::new("POST", "/api/v1/accounts").api_key().json(&json!({"username": "alice", "password": "alice's password", "role": "user"})).send_to(lb);
    assert_eq!(made.status, 201, "{}", made.text());
    let login = |from: &str, port: u16, claimed: &str, body: &serde_json::Value| {
        let claim = [("x-forwarded-for", claimed)];
        let headers: &[(&str, &str)] = if claimed.is_empty() { &[] } else { &claim };
        source::send_from(from, port, "POST", "/api/v1/auth/login", headers, Some(body))
    };

    // The attacker at 127.0.0.2 claims another address every time; nginx
    // appends the real peer, and only that is believed.
    let mut statuses = Vec::new();
    for i in 0..50 {
        let (status, _, body) = login("127.0.0.2", lb, &format!("198.51.100.{i}"), &json!({"username": "admin", "password": format!("guess {i}")}));
        assert!(status == 401 || status == 429, "{status}: {body}");
        statuses.push(status);
    }
    let checked = statuses.iter().filter(|s| **s == 401).count();
    // 10 free, the 11th blocks for 1 s, then 2 s, 4 s…: a few may be
    // checked as short blocks run out on a busy machine, never most.
    assert!(checked <= 14 && statuses[49] == 429, "{checked} of 50 guesses checked: {statuses:?}");

    // Another client signs in at once, as alice and as the admin.
    for (name, password) in [("alice", "alice's password"), ("admin", "correct horse battery")] {
        let started = Instant::now();
        let (status, _, body) = login("127.0.0.3", lb, "", &json!({"username": name, "password": password}));
        assert_eq!(status, 200, "{name}: {body}");
        assert!(started.elapsed() < Duration::from_secs(5), "{name} waited {:?}", started.elapsed());
    }
    // Every API-key request works, from the attacker's address too.
    for from in ["127.0.0.2", "127.0.0.3"] {
        for path in ["/api/v1/auth/me", "/gateway/logs?limit=1"] {
            let (status, _, body) = source::send_from(from, lb, "GET", path, &[("x-api-key", TEST_API_KEY)], None);
            assert_eq!(status, 200, "{from} {path}: {body}");
        }
        let (status, _, body) = login(from, lb, "", &json!({"api_key": TEST_API_KEY}));
        assert_eq!(status, 200, "{from} signs in with the key: {body}");
    }

    // Straight to the gateway, 127.0.0.4 is no trusted proxy: its
    // X-Forwarded-For is ignored, so new claims buy no new guesses.
    let direct: Vec<u16> = (0..20).map(|i| login("127.0.0.4", gw.port, &format!("192.0.2.{i}"), &json!({"username": "admin", "password": "wrong"})).0).collect();
    assert!(direct.iter().filter(|s| **s == 401).count() <= 14 && direct[19] == 429, "{direct:?}");
    assert!(nginx.error_log().lines().all(|l| !l.contains("[emerg]")), "{}", nginx.error_log());
}
