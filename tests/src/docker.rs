//! Docker for the tests that run the product's images for real.
//!
//! * **A daemon.** The machine's own when one answers (`DOCKER_HOST`, or
//!   `/var/run/docker.sock`); otherwise the kit starts `dockerd` itself, with
//!   its own data root under `target/docker/` (so images and the base image
//!   survive between runs), vfs storage and no networking of its own
//!   (containers use `--network host`). Test processes that use it hold a
//!   shared `flock` on `target/docker/users.lock`; the last one to exit
//!   stops a daemon the kit started. Starting and stopping happen under an
//!   exclusive `control.lock`, so parallel test processes (nextest) agree.
//! * **Images, once per build.** [`Docker::image`] builds with
//!   `deploy/build-image.sh` (the same script as `make image`) from this
//!   build's binaries, debug info stripped, tagged by a key over everything
//!   that goes into the image: a test process finds the image its siblings
//!   built and builds nothing.
//! * **Containers and volumes are guards**: dropped, they are removed, even
//!   when an assertion failed.
//!
//! When Docker cannot run, every function panics with what is missing: these
//! tests are never skipped silently.

use std::collections::hash_map::DefaultHasher;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{target_profile_dir, wait_until};

/// The images the product ships, as the tests build them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Image {
    /// `Dockerfile`: the gateway as PID 1.
    Gateway,
    /// `deploy/systemd.Dockerfile`: systemd as PID 1 and the unit installed as shipped.
    Systemd,
}

impl Image {
    fn repository(self) -> &'static str {
        match self {
            Image::Gateway => "omni-gateway",
            Image::Systemd => "omni-gateway-systemd",
        }
    }

    fn dockerfile(self) -> &'static str {
        match self {
            Image::Gateway => "Dockerfile",
            Image::Systemd => "deploy/systemd.Dockerfile",
        }
    }
}

/// A reachable daemon.
pub struct Docker {
    /// `DOCKER_HOST` for every command.
    host: String,
    /// Built images by kind, within this process.
    images: Mutex<Vec<(Image, String)>>,
}

/// The workspace's `target/`.
fn target_dir() -> PathBuf {
    target_profile_dir().parent().expect("target/<profile> has a parent").to_path_buf()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Where the kit keeps its daemon's state: data root, locks, log.
fn state_dir() -> PathBuf {
    let dir = target_dir().join("docker");
    fs::create_dir_all(&dir).expect("create target/docker");
    dir
}

/// Short paths for the socket and exec root (a Unix socket path is limited to
/// ~100 bytes), one per work tree.
fn run_dir() -> PathBuf {
    let mut h = DefaultHasher::new();
    state_dir().hash(&mut h);
    PathBuf::from(format!("/tmp/omni-dockerd-{:08x}", h.finish() as u32))
}

fn flock(file: &File, op: libc::c_int) -> bool {
    unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
}

fn lock_file(name: &str) -> File {
    File::options().create(true).truncate(false).write(true).open(state_dir().join(name)).expect("open lock file")
}

/// This process's shared lock on `users.lock`, released by [`release_at_exit`].
static USER_LOCK: Mutex<Option<File>> = Mutex::new(None);
static DOCKER: OnceLock<Docker> = OnceLock::new();

/// The daemon, started on first use in this process.
pub fn docker() -> &'static Docker {
    DOCKER.get_or_init(|| {
        let control = lock_file("control.lock");
        assert!(flock(&control, libc::LOCK_EX), "flock target/docker/control.lock");
        let host = find_or_start_daemon();
        let users = lock_file("users.lock");
        assert!(flock(&users, libc::LOCK_SH), "flock target/docker/users.lock");
        *USER_LOCK.lock().unwrap() = Some(users);
        unsafe { libc::atexit(release_at_exit) };
        drop(control);
        Docker { host, images: Mutex::new(Vec::new()) }
    })
}

/// The client: any version talks to the daemon (API negotiation); builds go
/// through deploy/build-image.sh, which picks a BuildKit-capable one.
const CLI: &str = "docker";

fn answers(host: &str) -> bool {
    Command::new(CLI)
        .args(["version", "--format", "{{.Server.Version}}"])
        .env("DOCKER_HOST", host)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn own_socket() -> String {
    format!("unix://{}/docker.sock", run_dir().display())
}

fn find_or_start_daemon() -> String {
    if let Ok(host) = std::env::var("DOCKER_HOST") {
        assert!(answers(&host), "DOCKER_HOST={host} is set but no Docker daemon answers there");
        return host;
    }
    let system = "unix:///var/run/docker.sock";
    if Path::new("/var/run/docker.sock").exists() && answers(system) {
        return system.to_string();
    }
    let own = own_socket();
    if answers(&own) {
        return own;
    }
    let which = |name: &str| Command::new("sh").args(["-c", &format!("command -v {name}")]).output().is_ok_and(|o| o.status.success());
    assert!(
        which("dockerd") && which(CLI),
        "the Docker tests need a Docker engine: apt-get install docker.io (.ci/run does), then run them as root; no daemon answers and dockerd is not installed"
    );
    assert!(unsafe { libc::geteuid() } == 0, "the Docker tests start their own dockerd, which needs root");
    let run = run_dir();
    fs::create_dir_all(&run).unwrap();
    let log = state_dir().join("dockerd.log");
    let data_root = state_dir().join("data-root");
    // Through sh and `&`: dockerd is re-parented to init, so it outlives this
    // test process (its siblings may still use it) and is reaped when it exits.
    let script = format!(
        "dockerd --storage-driver=vfs --iptables=false --ip-masq=false --bridge=none --data-root '{}' --exec-root '{}/exec' --pidfile '{}/dockerd.pid' -H '{}' >>'{}' 2>&1 </dev/null &",
        data_root.display(),
        run.display(),
        run.display(),
        own,
        log.display()
    );
    let status = Command::new("setsid").args(["sh", "-c", &script]).status().expect("start dockerd");
    assert!(status.success(), "could not start dockerd");
    let started = Instant::now();
    while !answers(&own) {
        if started.elapsed() > Duration::from_secs(60) {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            panic!("dockerd did not answer on {own} within 60 s; its log ({}) ends with:\n{}", log.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("docker: started dockerd on {own} in {} ms", started.elapsed().as_millis());
    own
}

/// At exit: the last test process using the kit's own daemon stops it.
extern "C" fn release_at_exit() {
    // Nothing may unwind out of an atexit handler.
    let _ = std::panic::catch_unwind(release);
}

fn release() {
    let Ok(mut guard) = USER_LOCK.lock() else { return };
    let Some(users) = guard.take() else { return };
    let control = lock_file("control.lock");
    if !flock(&control, libc::LOCK_EX) {
        return;
    }
    drop(users);
    let probe = lock_file("users.lock");
    let last = flock(&probe, libc::LOCK_EX | libc::LOCK_NB);
    let ours = DOCKER.get().is_some_and(|d| d.host == own_socket());
    if last && ours {
        stop_own_daemon();
    }
}

fn stop_own_daemon() {
    let pidfile = run_dir().join("dockerd.pid");
    let Some(pid) = fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()) else { return };
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Docker {
    /// `docker <args>` against this daemon.
    pub fn command(&self) -> Command {
        let mut c = Command::new(CLI);
        c.env("DOCKER_HOST", &self.host).stdin(Stdio::null());
        c
    }

    /// Runs `docker <args>`, returning its output whatever the exit status.
    pub fn output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
    }

    /// Runs `docker <args>`, panicking with its stderr unless it succeeds; stdout trimmed.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(out.status.success(), "docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The tag of `image`, built from this build's binaries if no test process built it yet.
    pub fn image(&self, image: Image) -> String {
        let mut built = self.images.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, tag)) = built.iter().find(|(i, _)| *i == image) {
            return tag.clone();
        }
        let key = build_key(image);
        let tag = format!("{}:test-{key}", image.repository());
        let lock = lock_file("build.lock");
        assert!(flock(&lock, libc::LOCK_EX), "flock target/docker/build.lock");
        if !self.output(&["image", "inspect", &tag]).status.success() {
            let started = Instant::now();
            let bins = stripped_binaries(&key);
            let log = state_dir().join(format!("build-{}.log", image.repository()));
            let out = Command::new("sh")
                .arg(repo_root().join("deploy/build-image.sh"))
                .args(["-t", &tag, "-f", image.dockerfile(), "-b"])
                .arg(&bins)
                .env("DOCKER_HOST", &self.host)
                .stdin(Stdio::null())
                .output()
                .expect("run deploy/build-image.sh");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let _ = fs::write(&log, &text);
            assert!(out.status.success(), "deploy/build-image.sh failed (log: {}):\n{}", log.display(), tail(&text, 60));
            eprintln!("docker: built {tag} in {:.1} s", started.elapsed().as_secs_f64());
            // Older test builds only fill the vfs data root.
            for old in self.run(&["images", "--format", "{{.Repository}}:{{.Tag}}", image.repository()]).lines() {
                if old != tag && old.contains(":test-") {
                    let _ = self.output(&["rmi", old]);
                }
            }
            // vfs stores every layer in full: keep the build cache (the apt
            // layers, the slow part) to the most recently used few GB.
            let _ = self.output(&["image", "prune", "-f"]);
            let _ = self.output(&["builder", "prune", "-f", "--keep-storage", "4gb"]);
        }
        built.push((image, tag.clone()));
        tag
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Everything that goes into an image, by size and mtime (binaries, which
/// carry the UI) or content (Dockerfiles, unit, scripts).
fn build_key(image: Image) -> String {
    let mut h = DefaultHasher::new();
    image.hash(&mut h);
    let root = repo_root();
    for file in [image.dockerfile(), "deploy/omni-gateway.service", "deploy/build-image.sh", "deploy/base-image.sh"] {
        fs::read(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}")).hash(&mut h);
    }
    let mut stack: Vec<PathBuf> = ["omni-gateway", "omni-api"].map(|b| target_profile_dir().join(b)).to_vec();
    while let Some(p) = stack.pop() {
        let meta = fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()).collect();
            entries.sort();
            stack.extend(entries);
        } else {
            (p.to_string_lossy().into_owned(), meta.len(), meta.mtime(), meta.mtime_nsec()).hash(&mut h);
        }
    }
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// This build's binaries without debug info: the debug build's 120 MB
/// binaries become ~10 MB, and vfs copies every layer in full.
fn stripped_binaries(key: &str) -> PathBuf {
    let dir = state_dir().join(format!("bin-{key}"));
    if dir.join("omni-api").is_file() {
        return dir;
    }
    for old in fs::read_dir(state_dir()).unwrap().flatten() {
        if old.file_name().to_string_lossy().starts_with("bin-") {
            let _ = fs::remove_dir_all(old.path());
        }
    }
    let tmp = state_dir().join(format!("bin-{key}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    for b in ["omni-gateway", "omni-api"] {
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(tmp.join(b))
            .arg(target_profile_dir().join(b))
            .status()
            .expect("strip (binutils)");
        assert!(status.success(), "strip {b} failed");
    }
    fs::rename(&tmp, &dir).unwrap();
    dir
}

/// A unique name for a container or volume of this test process.
pub fn unique_name(label: &str) -> String {
    format!("omni-test-{label}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A named volume, removed on drop.
pub struct Volume {
    pub name: String,
}

impl Volume {
    pub fn new(label: &str) -> Volume {
        let name = unique_name(label);
        docker().run(&["volume", "create", &name]);
        Volume { name }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = docker().output(&["volume", "rm", "-f", &self.name]);
    }
}

/// A container, removed (with its anonymous volumes) on drop.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker run -d --name <unique> <args>`.
    pub fn run(label: &str, args: &[&str]) -> Container {
        let container = Container { name: unique_name(label) };
        let mut full = vec!["run", "-d", "--name", &container.name];
        full.extend_from_slice(args);
        let out = docker().output(&full);
        assert!(out.status.success(), "docker {} failed: {}", full.join(" "), String::from_utf8_lossy(&out.stderr));
        container
    }

    /// `docker exec <name> <args>`, whatever its exit status.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["exec", &self.name];
        full.extend_from_slice(args);
        docker().output(&full)
    }

    /// `docker exec`, panicking unless it succeeds; stdout trimmed.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "docker exec {} {} failed ({}): {}{}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `docker inspect -f <format>`.
    pub fn inspect(&self, format: &str) -> String {
        docker().run(&["inspect", "-f", format, &self.name])
    }

    pub fn is_running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    /// Everything the container printed (stdout and stderr, all runs).
    pub fn logs(&self) -> String {
        let out = docker().output(&["logs", &self.name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// Waits for `docker inspect` to report the health check's `healthy`.
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_until(timeout, &format!("{} to be reported healthy", self.name), || {
            let state = self.inspect("{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}");
            if state.starts_with("exited") {
                panic!("{} exited:\n{}", self.name, self.logs());
            }
            (state == "running healthy").then_some(())
        });
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- logs of {} ---\n{}", self.name, tail(&self.logs(), 80));
        }
        let _ = docker().output(&["rm", "-f", "-v", &self.name]);
    }
}
