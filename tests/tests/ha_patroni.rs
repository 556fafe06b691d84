//! Gateways on a PostgreSQL run by Patroni (issue 30), all on loopback: etcd
//! and Patroni nodes of PostgreSQL started from the reference deployment in
//! `deploy/ha/` (omni_tests::patroni), two gateways with libpq's multi-host
//! `DATABASE_URL` behind nginx running `deploy/ha/nginx.conf`.
//!
//! * `kill -9` of the primary's postmaster under sequence-numbered writes
//!   through nginx: Patroni promotes the synchronous standby, no
//!   acknowledged write is lost, both gateways serve again without a
//!   restart, every refused write is a 503 with `Retry-After` answered
//!   quickly, and `/health` and `/gateway/status` say `failing_over` for the
//!   database meanwhile (the worker stays ready). The write unavailability
//!   (first failed to first successful write) is printed.
//! * A scheduled backup slot spanning a failover runs exactly once: the
//!   slot falls due between the kill and the first read-write "ready" line
//!   of PostgreSQL (asserted from the backup's name and PostgreSQL's log);
//!   the lease row (migration 0005) is read before and after (holder, epoch),
//!   the old leader gave it up, and the gateway that holds it afterwards
//!   wrote the slot's one backup.
//! * The same writers with HAProxy (`deploy/ha/haproxy.cfg`) instead of the
//!   multi-host URL: no acknowledged write lost either; while HAProxy's
//!   status page shows the `primary` backend DOWN, both gateways answer
//!   `/health` 503 (`unavailable`) and writes 503 with `Retry-After`, promptly.
//! * On three nodes, `patronictl switchover` to the synchronous standby,
//!   then `patronictl failover` to a lagging candidate (the asynchronous
//!   replica, its replay paused) that Patroni refuses: after each, no
//!   acknowledged write lost, both gateways serving, the write
//!   unavailability printed beside the promotion in PostgreSQL's log.
//! * nginx with `deploy/ha/nginx.conf` in front of three gateways (on a plain
//!   PostgreSQL: this is about nginx): a POST held in flight in a gateway
//!   that is then killed gets nginx's 502 and is never sent to another
//!   gateway; a GET in the same situation is sent to the next one and
//!   answered (its access log shows each gateway tried).
//! * `bench_failovers_and_write_throughput` (ignored): what `bench/ha.py` measures.

use crate::gateway;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::patroni::PatroniCluster;
use omni_tests::{free_port, wait_until, ChildGuard, Request, TempDir, TempPostgres, TEST_API_KEY};
use serde_json::json;

#[test]
fn the_reference_patroni_cluster_has_a_primary_and_a_synchronous_standby() {
    let cluster = PatroniCluster::start(2);
    let members = cluster.members();
    assert_eq!(members.len(), 2, "{}", cluster.list());
    let roles: Vec<&str> = members.iter().map(|m| m["Role"].as_str().unwrap_or("")).collect();
    assert!(roles.contains(&"Leader") && roles.contains(&"Sync Standby"), "patronictl list: {}", cluster.list());
    let primary = cluster.primary(Duration::from_secs(5));
    let mut client = cluster.nodes[primary].client().unwrap();
    let sync: String = client.query_one("SHOW synchronous_standby_names", &[]).unwrap().get(0);
    assert!(!sync.is_empty(), "synchronous_mode sets synchronous_standby_names on the primary");
    let multi = postgres::Client::connect(&cluster.database_url(), postgres::NoTls);
    let in_recovery: bool = multi.unwrap().query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get(0);
    assert!(!in_recovery, "the multi-host URL with target_session_attrs=read-write reaches the primary");
}

// ---------------------------------------------------------------- nginx

/// Debian's nginx running `deploy/ha/nginx.conf` (its ports replaced, the
/// gateways it names beyond those given left out) in front of two or three
/// gateways; stopped on drop. Its access log names every gateway each
/// request was sent to (`$upstream_addr`) and what each answered.
struct Nginx {
    child: ChildGuard,
    port: u16,
    dir: TempDir,
}

impl Nginx {
    fn start(gateways: &[u16]) -> Nginx {
        let dir = TempDir::new("ha-nginx");
        let port = free_port();
        let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ha/nginx.conf")).unwrap();
        assert!((2..=3).contains(&gateways.len()), "deploy/ha/nginx.conf names three gateways");
        let mut site = shipped;
        for (i, from) in [8882, 8883, 8884].iter().enumerate() {
            let from = format!("server 127.0.0.1:{from} ");
            assert_eq!(site.matches(&from).count(), 1, "deploy/ha/nginx.conf names {from:?} once");
            site = match gateways.get(i) {
                Some(to) => site.replace(&from, &format!("server 127.0.0.1:{to} ")),
                None => site.replace(&format!("    {from}max_fails=1 fail_timeout=5s;\n"), ""),
            };
        }
        assert_eq!(site.matches("listen 8080;").count(), 1);
        site = site.replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
        let d = dir.path().display();
        std::fs::write(dir.path().join("site.conf"), site).unwrap();
        let user = if omni_tests::is_root() { "user root;" } else { "" };
        let main = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\n{user}\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  log_format upstreams '$request_method $request_uri $status upstream=[$upstream_addr] upstream_status=[$upstream_status]';\n  access_log {d}/access.log upstreams;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/site.conf;\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut command = std::process::Command::new("nginx");
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = ChildGuard::spawn(&mut command);
        wait_until(Duration::from_secs(10), "nginx to listen", || {
            if let Some(status) = child.try_status() {
                panic!("nginx exited ({status}): {}", std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default());
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        Nginx { child, port, dir }
    }

    /// The access log's lines so far (see the log format above).
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.child.terminate(Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------- nginx: which requests go to a second gateway

/// The gateways whose worker has a backend waiting on a lock in a statement
/// on `omni_user_preferences`, one entry per backend: the workers are told
/// apart by the `application_name` in their `DATABASE_URL` (`names`).
fn waiting_on_the_lock(db: &mut postgres::Client, names: &[String]) -> Vec<usize> {
    let rows = db
        .query("SELECT application_name FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE '%omni_user_preferences%'", &[])
        .unwrap();
    rows.iter().filter_map(|r| names.iter().position(|n| *n == r.get::<_, String>(0))).collect()
}

/// What nginx's access log says of the last request logged as `request`
/// (method, path and status: `"POST /api/v1/preferences 502"`), once it is
/// logged: each gateway nginx tried, by port, with its status, in order.
fn upstreams_of(nginx: &Nginx, request: &str) -> Vec<(u16, String)> {
    let line = wait_until(Duration::from_secs(10), "nginx to log the request", || nginx.access_log().lines().rfind(|l| l.starts_with(request)).map(str::to_owned));
    let field = |name: &str| -> Vec<String> {
        let start = line.find(&format!("{name}=[")).unwrap_or_else(|| panic!("{name} in {line:?}")) + name.len() + 2;
        line[start..start + line[start..].find(']').unwrap()].split(", ").map(str::to_owned).collect()
    };
    let port = |address: &String| -> u16 { address.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{address:?} in {line:?}")) };
    field("upstream").iter().map(port).zip(field("upstream_status")).collect()
}

/// `deploy/ha/nginx.conf` has no `non_idempotent` in `proxy_next_upstream`:
/// a POST that reached a gateway which then dies is answered 502 and never
/// sent to another gateway (it may have been applied already), while a GET
/// in the same situation is sent to the next gateway and answered. Each
/// request is held in flight by a lock the test takes on the preferences
/// table, and its gateway (with its worker) gets SIGKILL meanwhile.
#[test]
fn nginx_retries_a_get_on_another_gateway_but_never_a_post_that_reached_one() {
    let pg = TempPostgres::start_new();
    let backups = TempDir::new("ha-nginx-backups");
    let dirs: Vec<TempDir> = (0..3).map(|_| workdir()).collect();
    let names: Vec<String> = (0..3).map(|i| format!("omni-api-gw{i}")).collect();
    let mut gws: Vec<Gateway> =
        dirs.iter().zip(&names).map(|(d, name)| gateway_on(&format!("{}?application_name={name}", pg.url()), d.path(), backups.path(), &[])).collect();
    let ports: Vec<u16> = gws.iter().map(|g| g.port).collect();
    let nginx = Nginx::start(&ports);
    let session = uuid::Uuid::new_v4().to_string();
    let ok = Request::new("POST", "/api/v1/preferences").session(&session).json(&json!({"key": "before", "value": "1"})).send_to(nginx.port);
    assert_eq!(ok.status, 200, "{}", ok.text());
    let mut watch = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let mut locker = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let kill = |gw: &mut Gateway| {
        let worker = gw.pid_of("api").expect("the worker's pid");
        gw.child.kill9();
        wait_until(Duration::from_secs(10), "the killed gateway's worker to be gone", || (!gateway::alive(worker)).then_some(()));
    };

    // 1. A POST held in flight in one gateway, which is then killed.
    locker.batch_execute("BEGIN; LOCK TABLE omni_user_preferences IN ACCESS EXCLUSIVE MODE").unwrap();
    let (port, s) = (nginx.port, session.clone());
    let post = std::thread::spawn(move || Request::new("POST", "/api/v1/preferences").session(&s).json(&json!({"key": "once", "value": "1"})).try_send(port));
    let a = wait_until(Duration::from_secs(30), "the POST to wait on the lock in one gateway's worker", || match waiting_on_the_lock(&mut watch, &names)[..] {
        [one] => Some(one),
        _ => None,
    });
    kill(&mut gws[a]);
    // Sent to another gateway, the POST would wait on the lock there: nginx
    // answering while the lock is held is the proof it was not.
    wait_until(Duration::from_secs(20), "nginx to answer the POST while the lock is still held", || post.is_finished().then_some(()));
    let answer = post.join().unwrap().map(|r| (r.status, r.text()));
    assert!(matches!(answer, Ok((502, _))), "the client of a POST whose gateway died is told so (nginx's 502): {answer:?}\nnginx: {}", nginx.error_log());
    let waiting = waiting_on_the_lock(&mut watch, &names);
    assert!(waiting.iter().all(|g| *g == a), "only the killed gateway's worker ever had the POST; waiting on the lock: {waiting:?} (killed: {a})");
    let tried = upstreams_of(&nginx, "POST /api/v1/preferences 502");
    assert_eq!(tried.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![ports[a]], "nginx sent the POST to the killed gateway only: {tried:?}");
    locker.batch_execute("ROLLBACK").unwrap();
    // The dead worker's statement, still queued on the server, may now
    // commit: once at most, from that gateway only.
    wait_until(Duration::from_secs(10), "the killed worker's backend to finish", || waiting_on_the_lock(&mut watch, &names).is_empty().then_some(()));
    let applied: i64 = watch.query_one("SELECT count(*) FROM omni_user_preferences WHERE key = 'once'", &[]).unwrap().get(0);
    assert!(applied <= 1, "the POST was applied {applied} times");
    eprintln!("POST through nginx to gateway {a} (killed in flight): 502, tried {tried:?}, applied {applied} time(s)");

    // 2. A GET held in flight in a live gateway, which is then killed: nginx sends it to the other one.
    locker.batch_execute("BEGIN; LOCK TABLE omni_user_preferences IN ACCESS EXCLUSIVE MODE").unwrap();
    let (port, s) = (nginx.port, session.clone());
    let get = std::thread::spawn(move || Request::get("/api/v1/preferences").session(&s).try_send(port));
    let b = wait_until(Duration::from_secs(30), "the GET to wait on the lock in one gateway's worker", || match waiting_on_the_lock(&mut watch, &names)[..] {
        [one] => Some(one),
        _ => None,
    });
    assert_ne!(b, a, "the killed gateway cannot have the GET");
    kill(&mut gws[b]);
    let c = 3 - a - b;
    wait_until(Duration::from_secs(20), "nginx to send the GET to the last live gateway, whose worker waits on the lock too", || {
        waiting_on_the_lock(&mut watch, &names).contains(&c).then_some(())
    });
    assert!(!get.is_finished(), "the GET is still in flight on the third gateway");
    locker.batch_execute("ROLLBACK").unwrap();
    let answer = get.join().unwrap().expect("an answer to the GET");
    assert_eq!(answer.status, 200, "{}\nnginx: {}", answer.text(), nginx.error_log());
    assert!(answer.text().contains("before"), "{}", answer.text());
    let tried = upstreams_of(&nginx, "GET /api/v1/preferences 200");
    let order: Vec<u16> = tried.iter().map(|(p, _)| *p).collect();
    assert_eq!(tried.last(), Some(&(ports[c], "200".to_owned())), "the GET was answered by the third gateway: {tried:?}");
    assert!(order.contains(&ports[b]), "the GET reached the killed gateway first: {tried:?}");
    eprintln!("GET through nginx to gateway {b} (killed in flight): retried, tried {tried:?}");
}

// ---------------------------------------------------------------- gateways

fn gateway_on(url: &str, dir: &Path, backups: &Path, extra: &[(&str, &str)]) -> Gateway {
    let mut builder = GatewayBuilder::new(dir).env("DATABASE_URL", url).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_BACKUP_DIR", backups.display().to_string());
    for (name, value) in extra {
        builder = builder.env(name, *value);
    }
    builder.start()
}

/// The `api` component of `/gateway/status`, and the `database` object.
fn status_of(gw: &Gateway) -> Option<(serde_json::Value, serde_json::Value)> {
    let doc = Request::get("/gateway/status").try_send(gw.port).ok()?.json();
    let api = doc["components"].as_array()?.iter().find(|c| c["name"] == "api")?.clone();
    Some((api, doc["database"].clone()))
}

/// One write's outcome, as the writer saw it.
#[derive(Clone, Debug)]
struct Outcome {
    started: Instant,
    /// `started` by the wall clock, to set beside PostgreSQL's log.
    wall: SystemTime,
    took: Duration,
    status: u16,
    retry_after: Option<String>,
    body: String,
}

/// One writer's outcomes in order, and the `(session, key)` it had acknowledged.
type Written = (Vec<Outcome>, Vec<(String, String)>);

/// What the writers' outcomes add up to against the rows on the new primary.
struct Tally {
    acknowledged: usize,
    /// Acknowledged writes missing from the database.
    lost: Vec<(String, String)>,
    /// Refused writes, each passed to the caller's check first.
    failed: usize,
    /// Write unavailability: the first failed write to the first successful one after it, over all writers.
    outage: Option<(Instant, Instant)>,
    /// The same span by the wall clock.
    outage_wall: Option<(SystemTime, SystemTime)>,
}

fn tally(db: &mut postgres::Client, results: &[Written], refused: impl Fn(&Outcome)) -> Tally {
    let stored: std::collections::BTreeSet<(String, String)> =
        db.query("SELECT session_id::text, key FROM omni_user_preferences", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut t = Tally { acknowledged: 0, lost: Vec::new(), failed: 0, outage: None, outage_wall: None };
    for (outcomes, acked) in results {
        t.acknowledged += acked.len();
        t.lost.extend(acked.iter().filter(|k| !stored.contains(*k)).cloned());
        for o in outcomes.iter().filter(|o| o.status != 200) {
            t.failed += 1;
            refused(o);
        }
        // Refused writes are answered well before the proxy's timeout.
        assert!(outcomes.iter().all(|o| o.took < Duration::from_secs(10)), "a write waited {:?}", outcomes.iter().map(|o| o.took).max());
        if let Some(first_failed) = outcomes.iter().position(|o| o.status != 200) {
            let back = outcomes[first_failed..].iter().find(|o| o.status == 200).expect("writes resumed");
            let (from, to) = (outcomes[first_failed].started, back.started + back.took);
            t.outage = Some(t.outage.map_or((from, to), |(f, tt)| (f.min(from), tt.max(to))));
            let (from, to) = (outcomes[first_failed].wall, back.wall + back.took);
            t.outage_wall = Some(t.outage_wall.map_or((from, to), |(f, tt)| (f.min(from), tt.max(to))));
        }
    }
    t
}

/// Sequence-numbered writes (the preferences API) through `port` until
/// `stop`: every outcome in order, and the `(session, key)` acknowledged.
fn writer(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Written> {
    std::thread::spawn(move || {
        let mut session = uuid::Uuid::new_v4().to_string();
        let (mut outcomes, mut acknowledged) = (Vec::new(), Vec::new());
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            // A session keeps at most 100 preferences: a new one every 90 writes.
            if n.is_multiple_of(90) {
                session = uuid::Uuid::new_v4().to_string();
            }
            let key = format!("seq-{n:06}");
            let (started, wall) = (Instant::now(), SystemTime::now());
            let answer = Request::new("POST", "/api/v1/preferences").session(&session).json(&json!({"key": key, "value": n.to_string()})).try_send(port);
            let took = started.elapsed();
            let (status, retry_after, body) = match answer {
                Ok(r) => (r.status, r.header("retry-after").map(str::to_owned), r.text()),
                Err(e) => (0, None, e.to_string()),
            };
            if status == 200 {
                acknowledged.push((session.clone(), key));
            }
            outcomes.push(Outcome { started, wall, took, status, retry_after, body });
            if status != 200 {
                // A client honouring Retry-After would wait; this one only
                // paces itself so the outage is measured finely.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (outcomes, acknowledged)
    })
}

/// Sets the flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Clears the flag when dropped.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[test]
fn kill_9_of_the_primary_loses_no_acknowledged_write_and_both_gateways_serve_again() {
    let cluster = PatroniCluster::start(2);
    let url = cluster.database_url();
    let backups = TempDir::new("ha-backups");
    let dirs: Vec<TempDir> = (0..2).map(|_| workdir()).collect();
    let gws: Vec<Gateway> = dirs.iter().map(|d| gateway_on(&url, d.path(), backups.path(), &[])).collect();
    let nginx = Nginx::start(&[gws[0].port, gws[1].port]);
    for gw in &gws {
        let health = gw.get("/health");
        assert_eq!(health.status, 200, "{}", health.text());
        assert_eq!(health.json()["database"]["state"], "ready");
    }
    let restarts_before: Vec<serde_json::Value> = gws.iter().map(|g| status_of(g).unwrap().0["restarts"].clone()).collect();

    let stop = Arc::new(AtomicBool::new(false));
    // The writers and watchers stop even when an assertion fails first.
    let _stop_on_drop = SetOnDrop(stop.clone());
    let writers: Vec<_> = (0..3).map(|_| writer(nginx.port, stop.clone())).collect();
    // Writes flow before the kill.
    let primary = cluster.primary(Duration::from_secs(5));
    let sync = cluster.sync_standby(Duration::from_secs(5));
    let mut app = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    wait_until(Duration::from_secs(60), "60 acknowledged writes before the kill", || {
        let n: i64 = app.query_one("SELECT count(*) FROM omni_user_preferences", &[]).ok()?.get(0);
        (n >= 60).then_some(())
    });
    drop(app);

    // Watch both gateways while the database fails over.
    let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let watching = Arc::new(AtomicBool::new(true));
    let _watching_off = ClearOnDrop(watching.clone());
    let watchers: Vec<_> = gws
        .iter()
        .map(|g| {
            let (port, seen, watching) = (g.port, seen.clone(), watching.clone());
            std::thread::spawn(move || {
                while watching.load(Ordering::Relaxed) {
                    let note = |what: String| *seen.lock().unwrap().entry(what).or_default() += 1;
                    if let Ok(r) = Request::get("/health").try_send(port) {
                        note(format!("/health {} database={}", r.status, r.json()["database"]["state"]));
                    }
                    if let Ok(r) = Request::get("/gateway/status").try_send(port) {
                        let doc = r.json();
                        let api = doc["components"].as_array().and_then(|l| l.iter().find(|c| c["name"] == "api").cloned()).unwrap_or_default();
                        note(format!("/gateway/status api={} database={}", api["state"], doc["database"]["state"]));
                    }
                }
            })
        })
        .collect();

    eprintln!("before the kill:\n{}", cluster.list());
    let killed = Instant::now();
    cluster.nodes[primary].kill9_postmaster();
    let promoted = wait_until(Duration::from_secs(60), "Patroni to promote the synchronous standby", || {
        (cluster.nodes[sync].rest("/primary") == Some(200)).then(Instant::now)
    });
    eprintln!("Patroni's REST API says {} is primary {:.2} s after the kill", cluster.nodes[sync].name, (promoted - killed).as_secs_f64());

    // Both gateways serve again by themselves, /health back to 200.
    for gw in &gws {
        wait_until(Duration::from_secs(30), "the gateway's /health to answer 200 again", || (gw.get("/health").status == 200).then_some(()));
    }
    // Some writes acknowledged after the promotion through each gateway.
    let session = uuid::Uuid::new_v4().to_string();
    for gw in &gws {
        let mut refused = Vec::new();
        wait_until(Duration::from_secs(30), "a write acknowledged through each gateway", || {
            let r = Request::new("POST", "/api/v1/preferences").session(&session).json(&json!({"key": format!("after-{}", gw.port), "value": "x"})).send_to(gw.port);
            if r.status != 200 {
                refused.push((r.status, r.text()));
            }
            (r.status == 200).then_some(())
        });
        let why: Vec<String> = gw.log().lines().filter(|l| l.contains("no database connection")).map(str::to_owned).collect();
        eprintln!("gateway {}: {} write(s) refused after /health said 200: {refused:?}\n{}", gw.port, refused.len(), why[why.len().saturating_sub(12)..].join("\n"));
    }
    let resumed = Instant::now();
    wait_until(Duration::from_secs(30), "writes to flow for 2 s after the failover", || (resumed.elapsed() > Duration::from_secs(2)).then_some(()));
    stop.store(true, Ordering::Relaxed);
    watching.store(false, Ordering::Relaxed);
    let results: Vec<Written> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for w in watchers {
        w.join().unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    eprintln!("seen on the gateways during the failover: {seen:#?}");

    // 0 acknowledged writes lost: every one is on the new primary.
    let new_primary = cluster.primary(Duration::from_secs(5));
    assert_eq!(new_primary, sync, "the synchronous standby was promoted");
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let error_log = nginx.dir.path().join("error.log");
    let Tally { acknowledged, lost, failed, outage, .. } = tally(&mut db, &results, |o| {
        assert_eq!(o.status, 503, "a refused write is a 503: {o:?}\nnginx: {}", std::fs::read_to_string(&error_log).unwrap_or_default());
        assert!(o.retry_after.as_deref().is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)), "a 503 carries Retry-After: {o:?}");
        assert!(o.body.contains("database_unavailable"), "{o:?}");
    });
    assert!(acknowledged > 60, "{acknowledged} writes acknowledged");
    assert!(lost.is_empty(), "{} acknowledged writes lost: {lost:?}", lost.len());
    let (from, to) = outage.expect("the kill made some write fail");
    eprintln!(
        "{acknowledged} writes acknowledged, 0 lost, {failed} refused (503 with Retry-After); write unavailability {:.2} s (first failed {:.2} s after the kill, Patroni's promotion seen at {:.2} s)",
        (to - from).as_secs_f64(),
        from.saturating_duration_since(killed).as_secs_f64(),
        (promoted - killed).as_secs_f64()
    );

    // The database was shown failing over, the worker never broken nor restarted.
    assert!(seen.keys().any(|k| k.starts_with("/health 503 database=\"failing_over\"")), "{seen:#?}");
    assert!(seen.keys().any(|k| k.contains("database=\"failing_over\"") && k.starts_with("/gateway/status")), "{seen:#?}");
    assert!(seen.keys().filter(|k| k.starts_with("/gateway/status")).all(|k| k.contains("api=\"ready\"")), "the worker stayed ready: {seen:#?}");
    let restarts_after: Vec<serde_json::Value> = gws.iter().map(|g| status_of(g).unwrap().0["restarts"].clone()).collect();
    assert_eq!(restarts_before, restarts_after, "no worker was restarted");
    assert!(gws.iter().all(|g| !g.log().contains("health check failed")), "{}", gws[0].log());
}

// ---------------------------------------------------------------- switchover, refused failover

/// Three writers through nginx across `event` (which returns once the
/// cluster has settled after it): 60 more writes acknowledged first, then
/// the event; then both gateways answer `/health` 200 and acknowledge a
/// write each, straight to them, and writes flow 2 s more. Checks what
/// holds after any event: no acknowledged write missing from the primary,
/// every refused write a 503 with `Retry-After` answered promptly, no
/// worker restarted.
fn writes_across(url: &str, gws: &[Gateway], nginx: &Nginx, event: impl FnOnce()) -> Tally {
    let restarts_before: Vec<serde_json::Value> = gws.iter().map(|g| status_of(g).unwrap().0["restarts"].clone()).collect();
    let count = |db: &mut postgres::Client| -> Option<i64> { db.query_one("SELECT count(*) FROM omni_user_preferences", &[]).ok().map(|r| r.get(0)) };
    let mut app = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let before = count(&mut app).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = SetOnDrop(stop.clone());
    let writers: Vec<_> = (0..3).map(|_| writer(nginx.port, stop.clone())).collect();
    wait_until(Duration::from_secs(60), "60 acknowledged writes before the event", || (count(&mut app)? >= before + 60).then_some(()));
    drop(app);

    event();

    for gw in gws {
        wait_until(Duration::from_secs(30), "the gateway's /health to answer 200 again", || (gw.get("/health").status == 200).then_some(()));
    }
    let session = uuid::Uuid::new_v4().to_string();
    for gw in gws {
        wait_until(Duration::from_secs(30), "a write acknowledged through each gateway", || {
            let r = Request::new("POST", "/api/v1/preferences").session(&session).json(&json!({"key": format!("after-{}", gw.port), "value": "x"})).send_to(gw.port);
            (r.status == 200).then_some(())
        });
    }
    let resumed = Instant::now();
    wait_until(Duration::from_secs(30), "writes to flow for 2 s after the event", || (resumed.elapsed() > Duration::from_secs(2)).then_some(()));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<Written> = writers.into_iter().map(|w| w.join().unwrap()).collect();

    let mut db = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let error_log = nginx.dir.path().join("error.log");
    let t = tally(&mut db, &results, |o| {
        assert_eq!(o.status, 503, "a refused write is a 503: {o:?}\nnginx: {}", std::fs::read_to_string(&error_log).unwrap_or_default());
        assert!(o.retry_after.as_deref().is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)), "a 503 carries Retry-After: {o:?}");
        assert!(o.body.contains("database_unavailable"), "{o:?}");
    });
    assert!(t.acknowledged > 60, "{} writes acknowledged", t.acknowledged);
    assert!(t.lost.is_empty(), "{} acknowledged writes lost: {:?}", t.lost.len(), t.lost);
    if t.failed > 0 {
        // What the writers were refused with is in the API's document.
        let doc = Request::get("/api/v1/openapi.json").send_to(gws[0].port).json();
        let documented = &doc["paths"]["/api/v1/preferences"]["post"]["responses"]["503"];
        assert!(documented["headers"].get("retry-after").is_some(), "POST /api/v1/preferences documents its 503 with Retry-After: {documented}");
    }
    let restarts_after: Vec<serde_json::Value> = gws.iter().map(|g| status_of(g).unwrap().0["restarts"].clone()).collect();
    assert_eq!(restarts_before, restarts_after, "no worker was restarted");
    assert!(gws.iter().all(|g| !g.log().contains("health check failed")), "{}", gws[0].log());
    t
}

fn seconds_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// `patronictl`'s output, both streams.
fn said(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The leader's `(name, timeline)` in `patronictl list`.
fn leader_and_timeline(cluster: &PatroniCluster) -> (String, i64) {
    let members = cluster.members();
    let leader = members.iter().find(|m| m["Role"] == "Leader").unwrap_or_else(|| panic!("no leader: {}", cluster.list()));
    (leader["Member"].as_str().unwrap_or_default().to_owned(), leader["TL"].as_i64().unwrap_or(-1))
}

#[test]
fn a_switchover_then_a_failover_to_a_lagging_candidate_refused_by_patroni_lose_no_acknowledged_write() {
    let cluster = PatroniCluster::start(3);
    let url = cluster.database_url();
    let backups = TempDir::new("ha-switchover-backups");
    let dirs: Vec<TempDir> = (0..2).map(|_| workdir()).collect();
    let gws: Vec<Gateway> = dirs.iter().map(|d| gateway_on(&url, d.path(), backups.path(), &[])).collect();
    let nginx = Nginx::start(&[gws[0].port, gws[1].port]);

    // 1. `patronictl switchover` to the synchronous standby.
    let (primary, sync) = (cluster.primary(Duration::from_secs(5)), cluster.sync_standby(Duration::from_secs(5)));
    let (old, new) = (cluster.nodes[primary].name.clone(), cluster.nodes[sync].name.clone());
    let (_, timeline_before) = leader_and_timeline(&cluster);
    let mut asked = SystemTime::UNIX_EPOCH;
    let t = writes_across(&url, &gws, &nginx, || {
        asked = SystemTime::now();
        let out = cluster.patronictl(&["switchover", "--leader", &old, "--candidate", &new, "--force"]);
        let text = said(&out);
        assert!(out.status.success() && text.contains(&format!("Successfully switched over to \"{new}\"")), "patronictl switchover: {text}\n{}", cluster.logs());
        wait_until(Duration::from_secs(60), "the old primary to follow the new one", || (cluster.nodes[primary].rest("/replica") == Some(200)).then_some(()));
    });
    assert_eq!(cluster.primary(Duration::from_secs(5)), sync, "{}", cluster.list());
    let (leader, timeline) = leader_and_timeline(&cluster);
    assert_eq!((leader.as_str(), timeline), (new.as_str(), timeline_before + 1), "{}", cluster.list());
    let ready = cluster.nodes[sync].accepts_writes_since(asked).unwrap_or_else(|| panic!("{new} logged no promotion\n{}", cluster.logs()));
    match t.outage_wall {
        Some((from, to)) => eprintln!(
            "switchover {old} -> {new}: {} writes acknowledged, 0 lost, {} refused (503 with Retry-After); write unavailability {:.2} s; \
             PostgreSQL on {new} accepted writes {:.2} s after patronictl was asked, writes acknowledged again {:.2} s after that",
            t.acknowledged,
            t.failed,
            seconds_between(from, to),
            seconds_between(asked, ready),
            seconds_between(ready, to)
        ),
        None => eprintln!("switchover {old} -> {new}: {} writes acknowledged, 0 lost, none refused", t.acknowledged),
    }

    // 2. `patronictl failover` to a candidate that lags: an asynchronous
    //    replica, its replay paused just before (Patroni resumes a paused
    //    replay at its next loop, so only just before). Patroni refuses
    //    (synchronous_mode promotes only the synchronous standby, the one
    //    that has every acknowledged commit); the primary stays.
    cluster.wait_healthy(Duration::from_secs(60));
    let primary = cluster.primary(Duration::from_secs(5));
    let lagging = wait_until(Duration::from_secs(30), "an asynchronous replica", || {
        cluster.nodes.iter().position(|n| n.rest("/replica") == Some(200) && n.rest("/sync") != Some(200))
    });
    let candidate = cluster.nodes[lagging].name.clone();
    let mut replica = cluster.nodes[lagging].client().unwrap();
    let (leader_before, timeline_before) = leader_and_timeline(&cluster);
    let mut behind = 0i64;
    let t = writes_across(&url, &gws, &nginx, || {
        // The writers move the primary's WAL past what the candidate replayed.
        replica.batch_execute("SELECT pg_wal_replay_pause()").unwrap();
        let mut admin = cluster.nodes[primary].client().unwrap();
        behind = wait_until(Duration::from_secs(30), "the paused candidate to lag", || {
            let replayed: String = replica.query_one("SELECT pg_last_wal_replay_lsn()::text", &[]).ok()?.get(0);
            let lag: i64 = admin.query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint", &[&replayed]).ok()?.get(0);
            (lag > 0).then_some(lag)
        });
        let out = cluster.patronictl(&["failover", "--candidate", &candidate, "--force"]);
        let text = said(&out);
        assert!(text.contains("Failover failed") && !text.contains("Successfully"), "patronictl failover to {candidate}: {text}\n{}", cluster.logs());
        let reason = format!("Failover candidate={candidate} does not match with sync_standbys");
        wait_until(Duration::from_secs(10), "the primary's Patroni to log why it refused", || cluster.nodes[primary].log().contains(&reason).then_some(()));
    });
    assert_eq!(t.failed, 0, "no write refused while Patroni refused the failover");
    assert_eq!(leader_and_timeline(&cluster), (leader_before.clone(), timeline_before), "the cluster kept its primary: {}", cluster.list());
    assert_eq!(cluster.nodes[primary].rest("/primary"), Some(200));
    assert_eq!(cluster.nodes[lagging].rest("/replica"), Some(200), "the candidate is still a replica");
    eprintln!(
        "failover to {candidate} ({behind} bytes of WAL behind, replay paused) refused by Patroni; {leader_before} kept leading on timeline {timeline_before}; \
         {} writes acknowledged, 0 lost, none refused",
        t.acknowledged
    );
    cluster.wait_healthy(Duration::from_secs(60));
}

// ---------------------------------------------------------------- leadership

/// The backup file each "backup written" line names, per gateway.
fn written_backups(gw: &Gateway) -> Vec<String> {
    gw.log()
        .lines()
        .filter(|l| l.contains("backup written") && !l.contains("scheduled backup written"))
        .filter_map(|l| {
            let at = l.find("omni_backup_")?;
            let end = l[at..].find(".sql")? + 4;
            Some(l[at..at + end].to_owned())
        })
        .collect()
}

fn backup_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "sql")).collect();
    files.sort();
    files
}

/// The lease row (migration 0005): `(holder, epoch, acquired_at)`.
fn lease(db: &mut postgres::Client) -> (String, i64, SystemTime) {
    let row = db.query_one("SELECT holder, epoch, acquired_at FROM omni_leader_lease", &[]).unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Which gateway's worker a lease holder (`host:pid:start`) is.
fn holder_gateway(gws: &[Gateway], holder: &str) -> Option<usize> {
    let pid: i64 = holder.split(':').nth(1)?.parse().ok()?;
    gws.iter().position(|g| g.pid_of("api").map(i64::from) == Some(pid))
}

/// How many lines of `gw`'s log contain `what`.
fn log_count(gw: &Gateway, what: &str) -> usize {
    gw.log().lines().filter(|l| l.contains(what)).count()
}

#[test]
fn a_scheduled_backup_slot_spanning_a_failover_runs_exactly_once() {
    const EVERY_S: u64 = 6;
    let every = Duration::from_secs(EVERY_S);
    let cluster = PatroniCluster::start(2);
    let url = cluster.database_url();
    let backups = TempDir::new("ha-scheduled");
    let dirs: Vec<TempDir> = (0..2).map(|_| workdir()).collect();
    let interval = format!("{EVERY_S}s");
    let schedule = [("OMNI_BACKUP_INTERVAL", interval.as_str()), ("OMNI_BACKUP_KEEP", "20")];
    let gws: Vec<Gateway> = dirs.iter().map(|d| gateway_on(&url, d.path(), backups.path(), &schedule)).collect();
    let leads = |gw: &Gateway| status_of(gw).and_then(|(api, _)| api["leader"].as_bool());
    let leader = wait_until(Duration::from_secs(30), "exactly one gateway to lead", || {
        let views: Vec<Option<bool>> = gws.iter().map(leads).collect();
        match views.as_slice() {
            [Some(true), Some(false)] => Some(0),
            [Some(false), Some(true)] => Some(1),
            _ => None,
        }
    });
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let (holder_before, epoch_before, _) = lease(&mut db);
    assert_eq!(holder_gateway(&gws, &holder_before), Some(leader), "the lease row names the worker of the gateway that says it leads: {holder_before}");
    drop(db);

    // The first scheduled backup; the next slot is due one interval after
    // the time in its name (contract::backups::schedule::next_due). That due
    // time is a clock by design, so the kill waits on the clock: 0.7 s
    // before it, so that it falls due while Patroni promotes the standby
    // (1.5 s at the fastest seen, 3.5-4.5 s as a rule: bench/ha.py). The
    // primary is found first, so nothing but the kill follows the wait.
    let first = wait_until(Duration::from_secs(60), "the first scheduled backup", || backup_files(backups.path()).first().cloned());
    let first_name = first.file_name().unwrap().to_string_lossy().into_owned();
    let taken = |name: &str| omni_contract::backups::name::time_of(name).unwrap_or_else(|| panic!("a backup name with its time: {name}"));
    let due = taken(&first_name) + every;
    let primary = cluster.primary(Duration::from_secs(5));
    wait_until(every + Duration::from_secs(5), "0.7 s before the next slot is due", || (SystemTime::now() + Duration::from_millis(700) >= due).then_some(()));
    let gave_up_before: Vec<usize> = gws.iter().map(|g| log_count(g, "leader lease: given up with the session")).collect();
    let killed = SystemTime::now();
    cluster.nodes[primary].kill9_postmaster();
    let new_primary = wait_until(Duration::from_secs(60), "a new primary", || cluster.nodes.iter().position(|n| n.rest("/primary") == Some(200)).filter(|i| *i != primary));
    // When a primary accepted writes again, by PostgreSQL's own log: the
    // first read-write "ready" line on any node after the kill.
    let writable = wait_until(Duration::from_secs(10), "the promoted node to log that it accepts writes", || {
        cluster.nodes.iter().filter_map(|n| n.accepts_writes_since(killed)).min()
    });
    let secs = |t: SystemTime| t.duration_since(killed).map_or_else(|e| -e.duration().as_secs_f64(), |d| d.as_secs_f64());
    eprintln!("{} promoted; it accepted writes {:.2} s after the kill; the slot was due at {:.2} s", cluster.nodes[new_primary].name, secs(writable), secs(due));
    assert!(killed < due && due < writable, "the slot fell due while no primary accepted writes: the kill, the slot, writes again at {:.2}, {:.2}, {:.2} s", 0.0, secs(due), secs(writable));

    // The slot that spanned the failover, and one more after it.
    wait_until(Duration::from_secs(60), "two scheduled backups after the failover", || (backup_files(backups.path()).len() >= 3).then_some(()));
    let files = backup_files(backups.path());
    let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    eprintln!("scheduled backups: {names:?}");
    assert_eq!(names[0], first_name);
    let by_gateway: Vec<Vec<String>> = gws.iter().map(written_backups).collect();
    let mut all: Vec<String> = by_gateway.concat();
    let count = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), count, "a backup was written by two gateways: {by_gateway:?}");
    // The spanning slot's backup was taken once a primary accepted writes
    // again (its name is its start, to the second), and it was the only one
    // for that slot: the next came a full interval later.
    let spanning = taken(&names[1]);
    assert!(spanning + Duration::from_secs(1) > writable, "{} was taken before a primary accepted writes ({:.2} s after the kill)", names[1], secs(writable));
    for pair in names.windows(2) {
        let gap = taken(&pair[1]).duration_since(taken(&pair[0])).unwrap_or_default();
        assert!(gap >= every, "two backups in one slot: {pair:?}");
        assert!(gap <= every + Duration::from_secs(30), "a slot was skipped: {pair:?} are {gap:?} apart");
    }

    // The lease across the failover, read on the new primary: the old
    // leader gave it up with its session; the lease row came over by
    // replication and names the worker that took it afterwards, and that
    // gateway says it leads and wrote the spanning slot's backup.
    let leaders = wait_until(Duration::from_secs(15), "exactly one leader after the failover", || {
        let views: Vec<Option<bool>> = gws.iter().map(leads).collect();
        (views.iter().filter(|l| **l == Some(true)).count() == 1 && views.iter().all(Option::is_some)).then_some(views)
    });
    let after = leaders.iter().position(|l| *l == Some(true)).unwrap();
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let (holder_after, epoch_after, acquired_after) = lease(&mut db);
    assert_eq!(holder_gateway(&gws, &holder_after), Some(after), "the lease row names the gateway that says it leads: {holder_after}");
    assert!(log_count(&gws[leader], "leader lease: given up with the session") > gave_up_before[leader], "the leader gave up the lease with its session:\n{}", gws[leader].log());
    assert!(by_gateway[after].contains(&names[1]), "the new leader wrote the spanning slot's backup {}: {by_gateway:?}", names[1]);
    // The row came over from the old primary with its holder's backend,
    // gone from the new server: whoever renewed or took it then did so
    // with the next epoch unless it was renewed within its 3 s.
    if holder_after != holder_before || writable.duration_since(killed).unwrap_or_default() > omni_contract::leader::LEASE_TTL {
        assert_eq!(epoch_after, epoch_before + 1, "the lease was taken again once, after the failover");
        assert!(acquired_after > killed, "taken after the kill");
    } else {
        assert!(epoch_after >= epoch_before);
    }
    let fenced: Vec<String> = gws.iter().flat_map(|g| g.log().lines().filter(|l| l.contains("cannot prove it leads")).map(str::to_owned).collect::<Vec<_>>()).collect();
    eprintln!(
        "lease: gateway {leader} (epoch {epoch_before}) before the kill; gateway {after} (epoch {epoch_after}, taken {:.2} s after the kill) after; the spanning slot's backup {} by gateway {after}; fence refusals: {fenced:?}",
        secs(acquired_after),
        names[1]
    );
}

// ---------------------------------------------------------------- HAProxy

#[test]
fn through_haproxy_kill_9_of_the_primary_loses_no_acknowledged_write() {
    let mut cluster = PatroniCluster::start(2);
    cluster.start_haproxy();
    let url = cluster.haproxy_url();
    let backups = TempDir::new("ha-haproxy-backups");
    let dirs: Vec<TempDir> = (0..2).map(|_| workdir()).collect();
    let gws: Vec<Gateway> = dirs.iter().map(|d| gateway_on(&url, d.path(), backups.path(), &[])).collect();
    let nginx = Nginx::start(&[gws[0].port, gws[1].port]);

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = SetOnDrop(stop.clone());
    let writers: Vec<_> = (0..3).map(|_| writer(nginx.port, stop.clone())).collect();
    let mut app = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    wait_until(Duration::from_secs(60), "60 acknowledged writes before the kill", || {
        let n: i64 = app.query_one("SELECT count(*) FROM omni_user_preferences", &[]).ok()?.get(0);
        (n >= 60).then_some(())
    });
    drop(app);
    let primary = cluster.primary(Duration::from_secs(5));
    let (old, other) = (cluster.nodes[primary].name.clone(), cluster.nodes[1 - primary].name.clone());
    let shows = |server: &str| cluster.haproxy_primary_status(server).unwrap_or_default();
    assert_eq!((shows(&old), shows(&other), shows("BACKEND")), ("UP".into(), "DOWN".into(), "UP".into()), "HAProxy's status page before the kill");
    // While the database fails over: HAProxy's status page polled on its
    // own (each change of the old node's, the new one's and the `primary`
    // backend's status, with its time), and both gateways asked straight,
    // `/health` and writes, every 200 ms each, each request on a thread of
    // its own so a slow answer does not hide the others. The gap is the killed postmaster gone to
    // HAProxy showing the new primary UP: no server of `primary` accepts
    // writes meanwhile.
    let sampling = AtomicBool::new(true);
    let started = Instant::now();
    let since = |t: Instant| t.saturating_duration_since(started);
    /// When it was asked (since `started`), which gateway, `/health` or a write, how long it took, the answer.
    type Sample = (Duration, usize, &'static str, Duration, Result<omni_tests::Response, String>);
    let (promoted, dead, new_primary, timeline, samples) = std::thread::scope(|scope| {
        let poller = scope.spawn(|| {
            let mut timeline: Vec<(Duration, (String, String, String))> = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                let now = (shows(&old), shows(&other), shows("BACKEND"));
                if timeline.last().is_none_or(|(_, last)| *last != now) {
                    timeline.push((since(Instant::now()), now));
                }
            }
            timeline
        });
        let samplers: Vec<_> = (0..gws.len())
            .flat_map(|g| [(g, "/health"), (g, "write")])
            .map(|(g, what)| {
                let (port, sampling) = (gws[g].port, &sampling);
                // A request every 200 ms, each on a thread of its own: one
                // that hangs for seconds does not keep the next from being
                // asked in the gap.
                scope.spawn(move || {
                    let samples: std::sync::Mutex<Vec<Sample>> = std::sync::Mutex::new(Vec::new());
                    std::thread::scope(|asks| {
                        while sampling.load(Ordering::Relaxed) {
                            let samples = &samples;
                            asks.spawn(move || {
                                let asked = Instant::now();
                                let answer = match what {
                                    "/health" => Request::get("/health").try_send(port),
                                    // A session keeps at most 100 preferences: one per write.
                                    _ => Request::new("POST", "/api/v1/preferences").session(&uuid::Uuid::new_v4().to_string()).json(&json!({"key": "gap", "value": "x"})).try_send(port),
                                };
                                samples.lock().unwrap().push((since(asked), g, what, asked.elapsed(), answer.map_err(|e| e.to_string())));
                            });
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    });
                    samples.into_inner().unwrap()
                })
            })
            .collect();
        cluster.nodes[primary].kill9_postmaster();
        let dead = since(Instant::now());
        let new_primary = wait_until(Duration::from_secs(60), "a new primary", || cluster.nodes.iter().position(|n| n.rest("/primary") == Some(200)).filter(|i| *i != primary));
        let promoted = since(Instant::now()) - dead;
        wait_until(Duration::from_secs(10), "HAProxy's status page to show the new primary UP, the old one DOWN", || {
            ((shows(&old), shows(&other), shows("BACKEND")) == ("DOWN".into(), "UP".into(), "UP".into())).then_some(())
        });
        sampling.store(false, Ordering::Relaxed);
        let samples: Vec<Sample> = samplers.into_iter().flat_map(|s| s.join().unwrap()).collect();
        (promoted, dead, new_primary, poller.join().unwrap(), samples)
    });
    for gw in &gws {
        wait_until(Duration::from_secs(60), "the gateway's /health to answer 200 again", || (gw.get("/health").status == 200).then_some(()));
    }
    let seconds = |d: Duration| d.as_secs_f64() - dead.as_secs_f64();
    let said = timeline.iter().map(|(at, (o, n, b))| format!("{:+.2} s: {old} {o}, {other} {n}, primary {b}", seconds(*at))).collect::<Vec<_>>().join("\n");
    eprintln!("HAProxy's status page, in seconds from the kill (Patroni promoted {other} at {:.2} s):\n{said}", promoted.as_secs_f64());
    let up_again = timeline.iter().find(|(_, (_, new, _))| new == "UP").map(|(at, _)| *at).expect("the new primary UP on the status page");
    // Not asserted: that the `primary` backend as a whole shows DOWN. It
    // need not: HAProxy checks Patroni's REST API, and the dead primary's
    // Patroni answers `/primary` 200 until its own loop sees PostgreSQL gone
    // (3-4 s here, loop_wait 2 s), by when the standby is promoting; its
    // check fails from then on while the new one's passes. Meanwhile HAProxy
    // sends connections to the dead node's port, which refuses them.
    //
    // What the gateways said in the gap: `/health` 503, every write a 503
    // with Retry-After, neither waiting until a proxy's timeout. The
    // database shows `unavailable` while HAProxy sends every connection to
    // the dead node (it hides the standbys), or `failing_over` when the
    // standby probe that follows the failed check lands just after the
    // promotion. Each takes seconds meanwhile: HAProxy holds a connection
    // while it retries the dead node (`retries 2`), so the check's 2 s (and
    // the probe's 1 s) or the pool's 2 s checkout run out first.
    let in_gap: Vec<&Sample> = samples.iter().filter(|(asked, _, _, _, _)| *asked >= dead && *asked < up_again).collect();
    let listed = in_gap
        .iter()
        .map(|(at, g, what, took, answer)| {
            let answer = answer.as_ref().map_or_else(|e| e.clone(), |r| format!("{} {}", r.status, r.json()["database"]["state"]));
            format!("{:+.2} s: gateway {g} {what}: {answer} in {:.2} s", seconds(*at), took.as_secs_f64())
        })
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("the gateways asked in the gap (to {:+.2} s):\n{listed}", seconds(up_again));
    // A request asked in the gap may be answered after the promotion: its
    // answer then may be the primary's (a `/health` waits for the probe
    // under way, which can reach the new primary). Every other answer is a
    // refusal, and each gateway refused both kinds.
    let primary_again = dead + promoted;
    for g in 0..gws.len() {
        for what in ["/health", "write"] {
            assert!(
                in_gap.iter().any(|(_, gg, w, _, answer)| *gg == g && *w == what && answer.as_ref().is_ok_and(|r| r.status == 503)),
                "gateway {g} refused {what} in the gap:\n{listed}"
            );
        }
    }
    let mut longest = Duration::ZERO;
    for (at, g, what, took, answer) in &in_gap {
        let r = answer.as_ref().unwrap_or_else(|e| panic!("gateway {g} {what} at {:+.2} s: {e}", seconds(*at)));
        longest = longest.max(*took);
        if r.status < 300 {
            assert!(*at + *took >= primary_again, "gateway {g} {what} asked at {:+.2} s answered {} {:.2} s later, before Patroni promoted {other} ({:.2} s): {}", seconds(*at), r.status, took.as_secs_f64(), promoted.as_secs_f64(), r.text());
            continue;
        }
        if *what == "/health" {
            let state = r.json()["database"]["state"].as_str().map(str::to_owned);
            assert!(r.status == 503 && matches!(state.as_deref(), Some("unavailable" | "failing_over")), "/health of gateway {g} at {:+.2} s: {}", seconds(*at), r.text());
        } else {
            assert_eq!(r.status, 503, "a write to gateway {g} at {:+.2} s: {}", seconds(*at), r.text());
            assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)), "a 503 carries Retry-After: {}", r.text());
            assert!(r.text().contains("database_unavailable"), "{}", r.text());
        }
    }
    assert!(longest < Duration::from_secs(5), "a gateway took {longest:?} to answer /health or a refused write (HAProxy's connect timeout is 4 s)");
    let resumed = Instant::now();
    wait_until(Duration::from_secs(30), "writes to flow for 2 s after the failover", || (resumed.elapsed() > Duration::from_secs(2)).then_some(()));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<Written> = writers.into_iter().map(|w| w.join().unwrap()).collect();

    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let in_recovery: bool = db.query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get(0);
    assert!(!in_recovery, "HAProxy routes to the new primary ({})", cluster.nodes[new_primary].name);
    let Tally { acknowledged, lost, failed, outage, .. } = tally(&mut db, &results, |o| {
        assert!(o.status == 503 || o.status == 502, "a refused write is a 503 (or nginx's 502 while no gateway is ready): {o:?}");
    });
    assert!(acknowledged > 60, "{acknowledged} writes acknowledged");
    assert!(lost.is_empty(), "{} acknowledged writes lost through HAProxy: {lost:?}", lost.len());
    let (from, to) = outage.expect("the kill made some write fail");
    eprintln!(
        "through HAProxy: {acknowledged} writes acknowledged, 0 lost, {failed} refused; write unavailability {:.2} s (Patroni's promotion seen at {:.2} s)",
        (to - from).as_secs_f64(),
        promoted.as_secs_f64()
    );
}

// ---------------------------------------------------------------- benchmark

/// Preference writes from `clients` threads for `seconds`, the threads
/// spread over `ports`: acknowledged writes per second, and the first
/// refusal (a thread stops at its first).
fn write_throughput(ports: &[u16], clients: usize, seconds: f64) -> (f64, Option<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = SetOnDrop(stop.clone());
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (port, stop) = (ports[i % ports.len()], stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut refused, mut session) = (0usize, None, uuid::Uuid::new_v4().to_string());
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if n.is_multiple_of(90) {
                        session = uuid::Uuid::new_v4().to_string();
                    }
                    let r = Request::new("POST", "/api/v1/preferences").session(&session).json(&json!({"key": format!("k-{n}"), "value": "v"})).try_send(port);
                    match r {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => {
                            refused = Some(format!("{} {}", r.status, r.text()));
                            break;
                        }
                        Err(e) => {
                            refused = Some(e.to_string());
                            break;
                        }
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    wait_until(Duration::from_secs_f64(seconds + 5.0), "the measuring window to end", || (started.elapsed().as_secs_f64() >= seconds).then_some(()));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let (mut ok, mut first_refusal) = (0, None);
    for (acknowledged, refused) in threads.into_iter().map(|t| t.join().unwrap()) {
        ok += acknowledged;
        first_refusal = first_refusal.or(refused);
    }
    (ok as f64 / elapsed, first_refusal)
}

/// The measurements behind `bench/ha.py` (run by it; `HA_BENCH_OUT` names
/// the JSON file written): `HA_BENCH_FAILOVERS` (10) kills of the primary's
/// postmaster under writers through nginx, each with the writers' own
/// unavailability and Patroni's promotion from its node's log; before them,
/// `HA_BENCH_ROUNDS` (3) interleaved rounds of `HA_BENCH_SECONDS` (10) of
/// preference writes through two gateways on the cluster and through one
/// gateway on its embedded PostgreSQL.
#[test]
#[ignore = "a benchmark: bench/ha.py runs it"]
fn bench_failovers_and_write_throughput() {
    let env = |name: &str, default: f64| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(default);
    let (failovers, rounds, seconds) = (env("HA_BENCH_FAILOVERS", 10.0) as usize, env("HA_BENCH_ROUNDS", 3.0) as usize, env("HA_BENCH_SECONDS", 10.0));
    let clients = env("HA_BENCH_CLIENTS", 8.0) as usize;
    let out = std::env::var("HA_BENCH_OUT").expect("HA_BENCH_OUT: the JSON file to write");
    let cluster = PatroniCluster::start(2);
    let url = cluster.database_url();
    let backups = TempDir::new("ha-bench-backups");
    let dirs: Vec<TempDir> = (0..3).map(|_| workdir()).collect();
    let gws: Vec<Gateway> = dirs[..2].iter().map(|d| gateway_on(&url, d.path(), backups.path(), &[])).collect();
    let nginx = Nginx::start(&[gws[0].port, gws[1].port]);

    // Throughput first, on the healthy cluster: its two gateways beside one
    // on its embedded PostgreSQL, interleaved.
    let embedded = GatewayBuilder::new(dirs[2].path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let ha_ports = [gws[0].port, gws[1].port];
    let mut samples = Vec::new();
    for round in 0..rounds {
        for (side, ports) in [("patroni_two_gateways", &ha_ports[..]), ("embedded_one_gateway", &[embedded.port][..])] {
            let (rate, refused) = write_throughput(ports, clients, seconds);
            assert!(refused.is_none(), "a write to {ports:?} was refused: {refused:?}");
            let sample = json!({"round": round + 1, "side": side, "writes_per_s": rate});
            eprintln!("{sample}");
            samples.push(sample);
        }
    }
    let mut events = Vec::new();
    for i in 0..failovers {
        cluster.wait_healthy(Duration::from_secs(120));
        let primary = cluster.primary(Duration::from_secs(5));
        let mut killed = SystemTime::UNIX_EPOCH;
        let mut promoted_node = primary;
        let t = writes_across(&url, &gws, &nginx, || {
            killed = SystemTime::now();
            cluster.nodes[primary].kill9_postmaster();
            promoted_node = wait_until(Duration::from_secs(60), "a new primary", || cluster.nodes.iter().position(|n| n.rest("/primary") == Some(200)).filter(|i| *i != primary));
        });
        let ready = cluster.nodes[promoted_node].accepts_writes_since(killed).unwrap_or_else(|| panic!("no promotion logged\n{}", cluster.logs()));
        let (from, to) = t.outage_wall.expect("the kill made some write fail");
        let event = json!({
            "failover": i + 1,
            "promoted": cluster.nodes[promoted_node].name,
            "acknowledged": t.acknowledged,
            "lost": t.lost.len(),
            "refused": t.failed,
            "unavailable_s": seconds_between(from, to),
            "patroni_promotion_s": seconds_between(killed, ready),
            "first_failed_after_kill_s": seconds_between(killed, from),
            "gateway_adds_s": seconds_between(ready, to),
        });
        eprintln!("{event}");
        events.push(event);
    }

    // The two gateways after the failovers: a short window, its first refusal noted.
    cluster.wait_healthy(Duration::from_secs(120));
    let (after, refused) = write_throughput(&ha_ports, clients, 3.0);
    eprintln!("after the failovers: {after:.0} writes/s, first refusal {refused:?}");
    let doc = json!({"after_failovers": {"writes_per_s": after, "first_refusal": refused}, "failovers": events, "throughput": samples, "clients": clients, "seconds": seconds, "cluster": cluster.list()});
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
}
