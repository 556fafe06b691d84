//! A highly available PostgreSQL run by Patroni, on loopback (issue 30): one
//! etcd member and two or three Patroni nodes of PostgreSQL, started from
//! the reference deployment in `deploy/ha/` (`etcd.env`,
//! `patroni-pg{1,2,3}.yml`, `haproxy.cfg`) with only addresses, ports and
//! directories replaced, so the reference is what the tests run.
//!
//! Debian's `patroni`, `etcd-server` and `haproxy` are installed by
//! `tests/ha/install.sh` when missing (called on first use). Patroni and
//! its PostgreSQL run as the `postgres` account when the tests run as root
//! (PostgreSQL refuses root). Everything is waited for by condition:
//! Patroni's REST API (`/primary`, `/replica`, `/sync` answering 200) and
//! `patronictl list`.
//!
//! Patroni starts its postmaster in a session of its own, so stopping
//! Patroni's process group does not stop PostgreSQL: on drop every node's
//! postmaster (read from its `postmaster.pid`) and its process group are
//! killed too, then etcd and HAProxy, even when the test failed.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{as_postgres_user, chown_tree, free_port, pg_bin_dir, wait_until, ChildGuard, Request, TempDir};

/// The application's role, password and database, made on the primary once
/// the cluster is up (as the README tells an operator to).
pub const APP_USER: &str = "omni";
pub const APP_PASSWORD: &str = "omni-ha-password";
pub const APP_DATABASE: &str = "omni";
/// The superuser's password in `deploy/ha/patroni-pg*.yml`.
const SUPERUSER_PASSWORD: &str = "change-this-superuser-password";

/// `deploy/ha/<name>`.
pub fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ha").join(name)
}

/// Paths of the tools, installing them once per test process if missing.
fn tools() -> &'static BTreeMap<String, PathBuf> {
    static TOOLS: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ha/install.sh");
        let output = Command::new("bash").arg(&script).stderr(Stdio::inherit()).output().expect("run tests/ha/install.sh");
        assert!(output.status.success(), "tests/ha/install.sh failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), PathBuf::from(v)))
            .collect()
    })
}

fn tool(name: &str) -> PathBuf {
    tools().get(name).cloned().unwrap_or_else(|| panic!("tests/ha/install.sh did not report {name}"))
}

/// `text` with `from` (which must occur exactly `count` times) replaced by `to`.
fn replace_exact(text: &str, file: &str, from: &str, count: usize, to: &str) -> String {
    assert_eq!(text.matches(from).count(), count, "deploy/ha/{file} names {from:?} {count} time(s)");
    text.replace(from, to)
}

/// One Patroni node: its process, its ports and its data directory.
pub struct PatroniNode {
    pub name: String,
    /// PostgreSQL's port on 127.0.0.1.
    pub pg_port: u16,
    /// Patroni's REST API port on 127.0.0.1.
    pub rest_port: u16,
    config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    patroni: Option<ChildGuard>,
}

impl PatroniNode {
    /// Status of `GET <path>` on this node's REST API (`None`: no answer).
    pub fn rest(&self, path: &str) -> Option<u16> {
        Request::get(path).try_send(self.rest_port).ok().map(|r| r.status)
    }

    /// Patroni's (and its PostgreSQL's) log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The postmaster's pid from `postmaster.pid`, if it runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        // A stale file, or a pid reused by something else, is no postmaster of ours.
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let data = self.data_dir.to_string_lossy();
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("postgres") && cmdline.contains(data.as_ref())).then_some(pid)
    }

    /// `kill -9` of the postmaster alone (Patroni keeps running); returns
    /// once the process is gone.
    pub fn kill9_postmaster(&self) {
        let pid = self.postmaster_pid().unwrap_or_else(|| panic!("{} runs no postmaster", self.name));
        // SAFETY: signalling a postmaster this cluster started (checked above).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_until(Duration::from_secs(10), "the killed postmaster to be gone", || {
            (!Path::new(&format!("/proc/{pid}")).exists() || proc_state(pid) == Some('Z')).then_some(())
        });
    }

    /// When this node's PostgreSQL, at or after `since`, first logged that
    /// it accepts read-write connections (`database system is ready to
    /// accept connections`, not the standby's `read-only` one): the end of a
    /// promotion, by PostgreSQL's own clock (`log_line_prefix` `%m`, UTC).
    pub fn accepts_writes_since(&self, since: SystemTime) -> Option<SystemTime> {
        self.log()
            .lines()
            .filter(|l| l.contains("database system is ready to accept connections"))
            .filter_map(postgres_log_time)
            .find(|at| *at >= since)
    }

    /// A superuser connection to this node's PostgreSQL.
    pub fn client(&self) -> Result<postgres::Client, postgres::Error> {
        let mut config = postgres::Config::new();
        config.host("127.0.0.1").port(self.pg_port).user("postgres").password(SUPERUSER_PASSWORD).dbname("postgres").connect_timeout(Duration::from_secs(3));
        config.connect(postgres::NoTls)
    }

    fn stop(&mut self) {
        if let Some(mut patroni) = self.patroni.take() {
            patroni.kill9();
        }
        if let Some(pid) = self.postmaster_pid() {
            // SAFETY: the postmaster leads its own process group (Patroni
            // starts it with setsid); its backends are in it.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The time at the start of a PostgreSQL log line (`2026-12-05 11:20:01.234 UTC [123] LOG: …`).
pub fn postgres_log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.get(..27)?;
    let (date, rest) = stamp.split_once(' ')?;
    let (time, zone) = rest.split_once(' ')?;
    if zone != "UTC" {
        return None;
    }
    let mut ymd = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, d) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let (hms, millis) = time.split_once('.')?;
    let mut hms = hms.split(':').map(|p| p.parse::<i64>());
    let (h, min, sec) = (hms.next()?.ok()?, hms.next()?.ok()?, hms.next()?.ok()?);
    let millis: u64 = millis.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let seconds = u64::try_from(days * 86_400 + h * 3600 + min * 60 + sec).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_millis(millis))
}

fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// etcd, two or three Patroni nodes, and optionally HAProxy: see the module.
pub struct PatroniCluster {
    pub nodes: Vec<PatroniNode>,
    pub etcd_port: u16,
    etcd: Option<ChildGuard>,
    /// HAProxy, its read-write port and its status page's port.
    haproxy: Option<(ChildGuard, u16, u16)>,
    dir: TempDir,
}

impl PatroniCluster {
    /// `size` (2 or 3) nodes with `synchronous_mode: true`; returns once one
    /// is primary, every other one a streaming replica, one of them the
    /// synchronous standby, and the application's role and database exist.
    pub fn start(size: usize) -> PatroniCluster {
        assert!((2..=3).contains(&size), "two or three nodes");
        let dir = TempDir::new("patroni");
        fs::create_dir_all(dir.path().join("sock")).unwrap();
        let etcd_port = free_port();
        let mut cluster = PatroniCluster { nodes: Vec::new(), etcd_port, etcd: None, haproxy: None, dir };
        cluster.etcd = Some(cluster.start_etcd());
        for n in 1..=size {
            let node = cluster.configure_node(n);
            cluster.nodes.push(node);
        }
        chown_tree(cluster.dir.path());
        // The first node bootstraps the cluster; the others start once it
        // leads, and copy it (pg_basebackup) instead of racing it.
        cluster.start_node(0);
        wait_until(Duration::from_secs(90), "the first Patroni node to lead", || (cluster.nodes[0].rest("/primary") == Some(200)).then_some(()));
        for i in 1..size {
            cluster.start_node(i);
        }
        cluster.wait_healthy(Duration::from_secs(120));
        let mut admin = cluster.nodes[0].client().expect("superuser connection to the primary");
        admin.batch_execute(&format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")).expect("creating the application's role");
        admin.batch_execute(&format!("CREATE DATABASE {APP_DATABASE} OWNER {APP_USER}")).expect("creating the application's database");
        cluster
    }

    fn start_etcd(&self) -> ChildGuard {
        let file = "etcd.env";
        let mut text = fs::read_to_string(deploy_file(file)).expect("deploy/ha/etcd.env");
        let peer_port = free_port();
        text = replace_exact(&text, file, "10.0.0.11:2379", 2, &format!("127.0.0.1:{}", self.etcd_port));
        text = replace_exact(&text, file, "10.0.0.11:2380", 3, &format!("127.0.0.1:{peer_port}"));
        // One member here: the reference's other two are dropped from the initial cluster.
        text = replace_exact(&text, file, ",pg2=http://10.0.0.12:2380,pg3=http://10.0.0.13:2380", 1, "");
        text = replace_exact(&text, file, "ETCD_DATA_DIR=/var/lib/etcd/omni", 1, &format!("ETCD_DATA_DIR={}", self.dir.path().join("etcd").display()));
        let env: Vec<(String, String)> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let log = fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let mut command = Command::new(tool("etcd"));
        command.envs(env).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let mut etcd = ChildGuard::spawn(&mut command);
        let port = self.etcd_port;
        wait_until(Duration::from_secs(30), "etcd to answer /health", || {
            if let Some(status) = etcd.try_status() {
                panic!("etcd exited with {status}:\n{}", fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default());
            }
            Request::get("/health").try_send(port).ok().filter(|r| r.status == 200 && r.text().contains("true")).map(|_| ())
        });
        etcd
    }

    /// Writes `deploy/ha/patroni-pg<n>.yml` with loopback ports and this
    /// cluster's directories.
    fn configure_node(&self, n: usize) -> PatroniNode {
        let file = format!("patroni-pg{n}.yml");
        let mut text = fs::read_to_string(deploy_file(&file)).unwrap_or_else(|e| panic!("deploy/ha/{file}: {e}"));
        let (pg_port, rest_port) = (free_port(), free_port());
        let data_dir = self.dir.path().join(format!("pg{n}"));
        text = replace_exact(&text, &file, &format!("10.0.0.1{n}:8008"), 2, &format!("127.0.0.1:{rest_port}"));
        text = replace_exact(&text, &file, &format!("10.0.0.1{n}:5432"), 2, &format!("127.0.0.1:{pg_port}"));
        text = replace_exact(&text, &file, "hosts: 10.0.0.11:2379,10.0.0.12:2379,10.0.0.13:2379", 1, &format!("hosts: 127.0.0.1:{}", self.etcd_port));
        text = replace_exact(&text, &file, "data_dir: /var/lib/postgresql/15/omni", 1, &format!("data_dir: {}", data_dir.display()));
        text = replace_exact(&text, &file, "bin_dir: /usr/lib/postgresql/15/bin", 1, &format!("bin_dir: {}", pg_bin_dir().display()));
        text = replace_exact(&text, &file, "unix_socket_directories: /var/run/postgresql", 1, &format!("unix_socket_directories: {}", self.dir.path().join("sock").display()));
        let config = self.dir.path().join(&file);
        fs::write(&config, text).unwrap();
        PatroniNode { name: format!("pg{n}"), pg_port, rest_port, config, data_dir, log: self.dir.path().join(format!("patroni-pg{n}.log")), patroni: None }
    }

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let mut command = Command::new(tool("patroni"));
        command
            .arg(&node.config)
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        node.patroni = Some(ChildGuard::spawn(as_postgres_user(&mut command)));
    }

    /// Waits until one node is primary, every other one a replica, and one
    /// replica the synchronous standby.
    pub fn wait_healthy(&self, timeout: Duration) {
        let what = "one Patroni primary, every other node a replica, one of them the synchronous standby";
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.healthy() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out after {timeout:?} waiting for {what}\n{}\n{}", self.list(), self.logs());
    }

    fn healthy(&self) -> bool {
        let primaries = self.nodes.iter().filter(|n| n.rest("/primary") == Some(200)).count();
        let replicas = self.nodes.iter().filter(|n| n.rest("/replica") == Some(200)).count();
        let sync = self.nodes.iter().filter(|n| n.rest("/sync") == Some(200)).count();
        primaries == 1 && replicas == self.nodes.len() - 1 && sync == 1
    }

    /// The node whose REST API says primary, waiting up to `timeout`.
    pub fn primary(&self, timeout: Duration) -> usize {
        wait_until(timeout, "a Patroni primary", || self.nodes.iter().position(|n| n.rest("/primary") == Some(200)))
    }

    /// The synchronous standby, waiting up to `timeout`.
    pub fn sync_standby(&self, timeout: Duration) -> usize {
        wait_until(timeout, "a synchronous standby", || self.nodes.iter().position(|n| n.rest("/sync") == Some(200)))
    }

    /// libpq's multi-host URL of every node, read-write sessions only: the
    /// client tries each host in turn and keeps the one that accepts writes.
    pub fn database_url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.pg_port)).collect();
        format!("postgresql://{APP_USER}:{APP_PASSWORD}@{}/{APP_DATABASE}?target_session_attrs=read-write", hosts.join(","))
    }

    /// `patronictl -c <node 1's config> <args>`.
    pub fn patronictl(&self, args: &[&str]) -> Output {
        Command::new(tool("patronictl")).arg("-c").arg(&self.nodes[0].config).args(args).env("HOME", self.dir.path()).output().expect("running patronictl")
    }

    /// `patronictl list`, for messages.
    pub fn list(&self) -> String {
        let out = self.patronictl(&["list"]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// `patronictl list -f json`: `(member, role, state, timeline)` of each member.
    pub fn members(&self) -> Vec<serde_json::Value> {
        let out = self.patronictl(&["list", "-f", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Every node's log, for failure messages (the last 60 lines of each).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log = n.log();
                let lines: Vec<&str> = log.lines().collect();
                format!("---- {} ----\n{}", n.name, lines[lines.len().saturating_sub(60)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// HAProxy with `deploy/ha/haproxy.cfg` in front of the nodes; returns
    /// the read-write port. Waits until it routes to the primary.
    pub fn start_haproxy(&mut self) -> u16 {
        let file = "haproxy.cfg";
        let mut text = fs::read_to_string(deploy_file(file)).expect("deploy/ha/haproxy.cfg");
        let (rw, ro, stats) = (free_port(), free_port(), free_port());
        text = replace_exact(&text, file, "bind *:5000", 1, &format!("bind 127.0.0.1:{rw}"));
        text = replace_exact(&text, file, "bind *:5001", 1, &format!("bind 127.0.0.1:{ro}"));
        text = replace_exact(&text, file, "bind *:7000", 1, &format!("bind 127.0.0.1:{stats}"));
        for n in 1..=3 {
            let line = |port: &str| format!("server pg{n} 10.0.0.1{n}:5432 maxconn 300 check port {port}");
            let shipped = line("8008");
            let replaced = match self.nodes.get(n - 1) {
                Some(node) => format!("server pg{n} 127.0.0.1:{} maxconn 300 check port {}", node.pg_port, node.rest_port),
                // Fewer nodes here than in the reference: the missing one is left out.
                None => String::new(),
            };
            text = replace_exact(&text, file, &shipped, 2, &replaced);
        }
        let config = self.dir.path().join(file);
        fs::write(&config, text).unwrap();
        let log = fs::File::create(self.dir.path().join("haproxy.log")).unwrap();
        let mut command = Command::new(tool("haproxy"));
        command.arg("-db").arg("-f").arg(&config).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let mut child = ChildGuard::spawn(&mut command);
        let url = self.haproxy_url_for(rw);
        wait_until(Duration::from_secs(30), "HAProxy to route to the primary", || {
            if let Some(status) = child.try_status() {
                panic!("haproxy exited with {status}:\n{}", fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default());
            }
            let mut client = postgres::Client::connect(&url, postgres::NoTls).ok()?;
            let in_recovery: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).ok()?.get(0);
            (!in_recovery).then_some(())
        });
        self.haproxy = Some((child, rw, stats));
        rw
    }

    /// The status on HAProxy's status page (`/;csv`) of the `primary`
    /// listener's `server` (a node's name, or `BACKEND` for the listener as a
    /// whole): `UP`, `DOWN`, or a transition such as `UP 1/2`; `None` when
    /// the page does not answer.
    pub fn haproxy_primary_status(&self, server: &str) -> Option<String> {
        let (_, _, stats) = self.haproxy.as_ref().expect("start_haproxy first");
        let csv = Request::get("/;csv").try_send(*stats).ok().filter(|r| r.status == 200)?.text();
        let header: Vec<&str> = csv.lines().next()?.trim_start_matches("# ").split(',').collect();
        let column = header.iter().position(|h| *h == "status")?;
        let row = csv.lines().find(|l| l.starts_with(&format!("primary,{server},")))?;
        row.split(',').nth(column).map(str::to_owned)
    }

    fn haproxy_url_for(&self, port: u16) -> String {
        format!("postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{port}/{APP_DATABASE}")
    }

    /// The URL through HAProxy's read-write port ([`PatroniCluster::start_haproxy`] first).
    pub fn haproxy_url(&self) -> String {
        let (_, port, _) = self.haproxy.as_ref().expect("start_haproxy first");
        self.haproxy_url_for(*port)
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        if let Some((mut haproxy, _, _)) = self.haproxy.take() {
            haproxy.kill9();
        }
        for node in &mut self.nodes {
            node.stop();
        }
        if let Some(mut etcd) = self.etcd.take() {
            etcd.kill9();
        }
    }
}
