//! Starting a real `omni-gateway` for end-to-end tests.
//!
//! Each gateway runs in its own temporary working directory (so the default
//! `./data/postgres` lands there), on free ports, with its stderr in a log file
//! that assertion messages quote. Dropping a [`Gateway`] stops it (SIGTERM,
//! then SIGKILL) and the directory goes with the [`TempDir`].

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use omni_tests::{bin_path, free_port, isolated_command, pg_bin_dir, wait_until, ChildGuard, Request, Response, TempDir};

#[derive(Clone)]
pub struct GatewayBuilder {
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    /// Variables the test set itself; the ports among them are never re-picked.
    chosen: std::collections::BTreeSet<String>,
    /// Let the gateway create its cluster itself (`initdb`) even where a
    /// copy of the shared template would do (see [`GatewayBuilder::spawn`]).
    fresh_cluster: bool,
}

impl GatewayBuilder {
    /// A gateway whose working directory is `cwd`.
    pub fn new(cwd: &Path) -> GatewayBuilder {
        let mut env = BTreeMap::new();
        env.insert("OMNI_PORT".to_owned(), free_port().to_string());
        env.insert("PGSERVE_PORT".to_owned(), free_port().to_string());
        env.insert("PGSERVE_BIN_DIR".to_owned(), pg_bin_dir().display().to_string());
        env.insert("LOG_LEVEL".to_owned(), "info".to_owned());
        GatewayBuilder { env, cwd: cwd.to_path_buf(), chosen: Default::default(), fresh_cluster: false }
    }

    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.chosen.insert(name.to_owned());
        self.env.insert(name.to_owned(), value.into());
        self
    }

    pub fn without_env(mut self, name: &str) -> Self {
        self.env.remove(name);
        self
    }

    /// The gateway's first start runs `initdb` itself, for the tests of how
    /// a cluster is created (its log lines, modes, marker, checksums).
    pub fn fresh_cluster(mut self) -> Self {
        self.fresh_cluster = true;
        self
    }

    /// Whether this start (by [`GatewayBuilder::start`], which expects a
    /// healthy gateway; `spawn` and `run_to_exit` never copy) would create a new embedded cluster in the
    /// default place with the default binaries: nothing of the gateway's in
    /// the working directory yet (no `data/`, no `.env`) and no variable
    /// that moves, replaces or forbids the cluster. Such a start is given a
    /// copy of the kit's template cluster ([`omni_tests::copy_gateway_cluster`]),
    /// the one `initdb` makes, instead of running `initdb` and flushing a
    /// new cluster to disk: seconds less on every first start.
    fn takes_template(&self) -> bool {
        let moved = ["OMNI_DATA_DIR", "PGSERVE_DATA_DIR", "DATABASE_URL", "PGSERVE_REQUIRE_EXISTING", "OMNI_SETTINGS_FILE"].iter().any(|v| self.env.contains_key(*v));
        let memory = self.env.get("PGSERVE_MEMORY_MODE").is_some_and(|v| v != "false");
        let default_bin = self.env.get("PGSERVE_BIN_DIR").is_some_and(|b| Path::new(b) == pg_bin_dir());
        !self.fresh_cluster && !moved && !memory && default_bin && !self.cwd.join("data").exists() && !self.cwd.join(".env").exists()
    }

    pub fn spawn(self) -> Gateway {
        let log = self.cwd.join(format!("gateway-{}.log", uuid::Uuid::new_v4().simple()));
        let mut command = isolated_command(&bin_path("omni-gateway"), &self.cwd, &self.env, &log);
        let port: u16 = self.env.get("OMNI_PORT").and_then(|p| p.parse().ok()).unwrap_or(0);
        let pg_port: u16 = self.env["PGSERVE_PORT"].parse().unwrap();
        Gateway { child: ChildGuard::spawn(&mut command), port, pg_port, cwd: self.cwd, log }
    }

    /// Spawns and waits for `/health` 200.
    ///
    /// A port from `free_port()` was free when picked, but another process
    /// (any outgoing connection on this busy machine) may take it before the
    /// gateway binds it. When the gateway stops at start for that reason and
    /// the port was picked here, not by the test, it is started again with
    /// fresh ports; every other early exit fails the test.
    pub fn start(self) -> Gateway {
        if self.takes_template() {
            omni_tests::copy_gateway_cluster(&pg_bin_dir(), &self.cwd);
        }
        let mut builder = self;
        for attempt in 1.. {
            let mut gw = builder.clone().spawn();
            match gw.try_wait_healthy() {
                Ok(()) => return gw,
                Err(log) if attempt < 3 && log.contains("already in use") && !builder.chosen.contains("OMNI_PORT") && !builder.chosen.contains("PGSERVE_PORT") => {
                    builder.env.insert("OMNI_PORT".to_owned(), free_port().to_string());
                    builder.env.insert("PGSERVE_PORT".to_owned(), free_port().to_string());
                }
                Err(log) => panic!("omni-gateway did not become ready: {log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Spawns, expects the process to exit by itself, returns its status and log.
    pub fn run_to_exit(self) -> (ExitStatus, String) {
        let mut gw = self.spawn();
        let status = gw.child.wait_exit(Duration::from_secs(60));
        (status, gw.log())
    }
}

pub struct Gateway {
    pub child: ChildGuard,
    pub port: u16,
    pub pg_port: u16,
    pub cwd: PathBuf,
    log: PathBuf,
}

impl Gateway {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Response {
        Request::get(path).port(self.port).send()
    }

    pub fn wait_healthy(&mut self) {
        if let Err(log) = self.try_wait_healthy() {
            panic!("omni-gateway did not become ready: {log}");
        }
    }

    /// Waits for `/health` 200; `Err` with the log if the gateway exits
    /// first, if its log says a port was taken (PostgreSQL's port can be
    /// taken between the gateway's check and its bind; the gateway then keeps
    /// retrying rather than exit), or after 60 s.
    fn try_wait_healthy(&mut self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_status() {
                return Err(format!("exit {status}\n{}", self.log()));
            }
            if Request::get("/health").try_send(self.port).is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            let log = self.log();
            if log.contains("already in use") {
                return Err(format!("still running, a port was taken\n{log}"));
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!("still running, /health not 200 after 60 s\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `/gateway/status` entry of `name`.
    pub fn component(&self, name: &str) -> serde_json::Value {
        let status = self.get("/gateway/status").json();
        status["components"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no component {name} in {status}"))
    }

    pub fn pid_of(&self, name: &str) -> Option<i32> {
        self.component(name)["pid"].as_i64().map(|p| p as i32)
    }

    /// Waits until `name`'s entry satisfies `pred`, returning it.
    pub fn wait_component(&self, name: &str, what: &str, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_until(timeout, what, || {
            let c = self.component(name);
            pred(&c).then_some(c)
        })
    }

    /// SIGTERM to the gateway alone; waits for its exit.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: signalling the gateway process we started.
        unsafe { libc::kill(self.child.pid() as i32, libc::SIGTERM) };
        self.child.wait_exit(Duration::from_secs(60))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.cwd.join("data/postgres")
    }

    /// A connection to the app database as the superuser, with the password the gateway generated.
    pub fn db(&self) -> postgres::Client {
        let password = std::fs::read_to_string(self.cwd.join("data/postgres.password")).expect("password file");
        let url = format!("postgres://postgres:{}@127.0.0.1:{}/omni", password.trim(), self.pg_port);
        postgres::Client::connect(&url, postgres::NoTls).expect("connect to the embedded PostgreSQL")
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().map(|rest| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// The machine lost at once: the gateway and every PostgreSQL process of
/// its cluster get SIGKILL together. Returns the moment of the kill (what a
/// lost write is measured back from); [`wait_postgres_gone`] waits for the
/// processes to be reaped.
pub fn kill9_with_its_postgres(gw: &mut Gateway) -> Instant {
    let postgres = postgres_pids_on(&gw.data_dir());
    let killed_at = Instant::now();
    gw.child.kill9();
    for pid in postgres {
        // SAFETY: SIGKILL to a postgres process of this test's cluster.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    killed_at
}

/// Waits until no postgres process names `data_dir` any more.
pub fn wait_postgres_gone(data_dir: &Path) {
    wait_until(Duration::from_secs(30), "every postgres process to be gone", || postgres_pids_on(data_dir).is_empty().then_some(()));
}

/// Pids of live postgres processes whose command line names `dir`.
pub fn postgres_pids_on(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains("postgres") && c.contains(&needle)
                })
                .unwrap_or(false)
                && alive(*pid)
        })
        .collect()
}

/// Runs `omni-gateway <args>` in `cwd`, as an operator would next to a
/// running gateway: success, stdout, stderr.
pub fn cli(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    cli_env(cwd, args, &[])
}

/// [`cli`] with extra environment variables (the gateway's ports, say).
pub fn cli_env(cwd: &Path, args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let out = std::process::Command::new(bin_path("omni-gateway"))
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVE_BIN_DIR", pg_bin_dir())
        .env("LOG_LEVEL", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("running omni-gateway");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A working directory for one gateway.
pub fn workdir() -> TempDir {
    TempDir::new("gw")
}

/// `<sysid>-pg<major>`: the generation of the gateway's WAL archive, its
/// folder in an off-site repository.
pub fn generation(gw: &Gateway) -> String {
    let identity: serde_json::Value = serde_json::from_slice(&std::fs::read(gw.cwd.join("data/wal/identity.json")).unwrap()).unwrap();
    format!("{}-pg{}", identity["system_identifier"].as_str().unwrap(), identity["major"])
}

/// The id of the oldest base backup recorded in the archive of the
/// gateway that ran in `cwd` (`data/wal/base/<id>.json`).
pub fn oldest_base_backup(cwd: &Path) -> String {
    std::fs::read_dir(cwd.join("data/wal/base")).unwrap().flatten().filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".json").map(str::to_owned)).min().expect("a base backup is recorded")
}

/// The `repository` entry of `/gateway/status`.
pub fn repository_status(gw: &Gateway) -> serde_json::Value {
    gw.get("/gateway/status").json()["repository"].clone()
}

/// Waits until the first verified base backup is recorded (point-in-time recovery).
pub fn wait_for_base_backup(gw: &Gateway) {
    let base = gw.cwd.join("data/wal/base");
    wait_until(Duration::from_secs(120), "the first verified base backup", || {
        std::fs::read_dir(&base).ok()?.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".json")).then_some(())
    });
    wait_until(Duration::from_secs(30), "the wal component to be ready", || (gw.component("wal")["state"] == "ready").then_some(()));
}

/// Waits until the WAL streamer has flushed everything written so far.
pub fn wait_archived(db: &mut postgres::Client) {
    let lsn: String = db.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    wait_until(Duration::from_secs(30), "the WAL streamer to flush the writes", || {
        let q = format!("SELECT coalesce((SELECT flush_lsn >= '{lsn}'::pg_lsn FROM pg_stat_replication WHERE application_name = 'omni_wal'), false)");
        db.query_one(&q, &[]).unwrap().get::<_, bool>(0).then_some(())
    });
}

/// Writes A (50 rows of `pitr_rows`), notes T on the server's clock (the one
/// commit times are stamped with), writes B (50 more), and waits until the
/// WAL streamer has archived them; returns T as RFC 3339.
pub fn write_a_note_t_write_b(gw: &Gateway) -> String {
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE pitr_rows (id int PRIMARY KEY, phase text NOT NULL)").unwrap();
    for i in 0..50 {
        db.execute("INSERT INTO pitr_rows VALUES ($1, 'A')", &[&i]).unwrap();
    }
    let t: String = db.query_one(r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#, &[]).unwrap().get(0);
    for i in 50..100 {
        db.execute("INSERT INTO pitr_rows VALUES ($1, 'B')", &[&i]).unwrap();
    }
    wait_archived(&mut db);
    t
}

/// A `PGSERVE_BIN_DIR` in `dir/<folder>`: the real PostgreSQL binaries,
/// except `name`, which is the shell `script` (it usually execs the real one
/// after doing what the test needs).
pub fn bin_dir_with(dir: &Path, folder: &str, name: &str, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join(folder);
    std::fs::create_dir(&bin).unwrap();
    for entry in std::fs::read_dir(pg_bin_dir()).unwrap().flatten() {
        if entry.file_name() != name {
            std::os::unix::fs::symlink(entry.path(), bin.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(bin.join(name), script).unwrap();
    std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// A POST with the API key that may take minutes (a restore; the kit's
/// requests give up after 30 s): the status and the raw answer, or the error
/// when the gateway goes away meanwhile.
pub fn try_post_slow(port: u16, path: &str, body: &serde_json::Value) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let body = body.to_string();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\nx-api-key: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        omni_tests::TEST_API_KEY,
        body.len()
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let status: u16 = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, raw))
}

/// [`try_post_slow`] that must be answered: the status and the JSON body (`Null` when none).
pub fn post_slow(port: u16, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, raw) = try_post_slow(port, path, body).unwrap_or_else(|e| panic!("POST {path}: {e}"));
    assert_ne!(status, 0, "no status line in {raw:?}");
    let json = raw.split_once("\r\n\r\n").map(|(_, b)| b).and_then(|b| serde_json::from_str(b).ok()).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Two on-demand base backups (`POST /api/v1/backup/base`), the second
/// once the first is over 1 s old, so that with 1 s windows the first one and
/// the WAL before the second are no longer needed; returns the second's id.
pub fn two_base_backups_a_second_apart(gw: &Gateway) -> String {
    take_base_backup(gw);
    let done = Instant::now();
    wait_until(Duration::from_secs(5), "the first base backup to be over 1 s old", || (done.elapsed() > Duration::from_millis(1100)).then_some(()));
    take_base_backup(gw)
}

/// An on-demand base backup (`POST /api/v1/backup/base`); returns its id.
pub fn take_base_backup(gw: &Gateway) -> String {
    let taken = Request::new("POST", "/api/v1/backup/base").api_key().send_to(gw.port);
    assert_eq!(taken.status, 200, "{}", taken.text());
    taken.json()["id"].as_str().unwrap().to_owned()
}

/// [`wait_until`] that fails with the gateway's off-site repository status
/// and its log lines about it (and its warnings and errors).
pub fn wait_for_repository<T>(gw: &Gateway, timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            let log: Vec<String> = gw.log().lines().filter(|l| l.contains("repository") || l.contains("ERROR") || l.contains("WARN")).map(str::to_owned).collect();
            panic!("timed out after {} s waiting for {what}\nrepository: {}\n{}", timeout.as_secs(), gw.get("/gateway/status").json()["repository"], log.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new age key pair by Debian's `age-keygen` in `dir/name`: (key file, public key).
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = std::process::Command::new("age-keygen").arg("-o").arg(&key).output().expect("age-keygen (Debian's age package) is installed");
    assert!(out.status.success(), "age-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let public = std::process::Command::new("age-keygen").arg("-y").arg(&key).output().unwrap();
    (key, String::from_utf8(public.stdout).unwrap().trim().to_owned())
}

/// `age -d -i key` of `file` (Debian's `age`), with `lz4 -d` after it when `lz4`.
pub fn age_decrypt(key: &Path, file: &Path, lz4: bool) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let out = Command::new("age").arg("-d").arg("-i").arg(key).arg(file).output().unwrap();
    assert!(out.status.success(), "age -d {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    if !lz4 {
        return out.stdout;
    }
    let mut child = Command::new("lz4").args(["-d", "-c"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("lz4 (Debian's lz4 package) is installed");
    let mut stdin = child.stdin.take().unwrap();
    let input = out.stdout;
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let done = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(done.status.success(), "lz4 -d of {}", file.display());
    done.stdout
}

/// Every file under `dir`, recursively, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}
