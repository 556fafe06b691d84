//! `postmaster.pid`: does the PostgreSQL it names still run on this data
//! directory? One judgement, used by the start (which removes a stale file
//! and refuses on a live one) and by `omni-gateway doctor` (which only says).
//!
//! The judgement never guesses "stale". A file is stale only when its process
//! is provably gone, or provably something other than a PostgreSQL of this
//! directory. Removing a live file is the one mistake that corrupts data: a
//! second postmaster starts on the same files, and PostgreSQL's own interlock
//! (which reads this very file) can no longer stop it. So when the kernel
//! will not say — another user's `/proc/<pid>/cwd` needs ptrace rights,
//! which containers drop (`CAP_SYS_PTRACE`), `/proc` may hide other users'
//! processes (`hidepid`, systemd's `ProtectProc=`) — the verdict is
//! [`Verdict::CannotTell`], and that is treated as live: the start is refused
//! with the reason and what to do.
//!
//! Facts are gathered first ([`Facts::gather`]: `kill(pid, 0)` as `pg_ctl
//! status` does, `/proc/<pid>/stat`, `cmdline` and `cwd`, and the SysV
//! shared-memory interlock recorded on the file's 7th line, checked with
//! `shmctl(IPC_STAT)` as the postmaster itself does, or read from
//! `/proc/sysvipc/shm` where a container's root may not stat the postgres
//! user's segment), then judged by a pure
//! function ([`judge`]) that the unit tests below exercise case by case.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What the file says (PostgreSQL's `pidfile.h` line layout).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PidFile {
    /// Line 1: the postmaster's pid; `None` when the line is not a positive number.
    pub pid: Option<i32>,
    /// Line 2: the data directory as the postmaster was given it.
    pub data_dir: Option<PathBuf>,
    /// Line 4: the TCP port.
    pub port: Option<u16>,
    /// Line 7: the shared-memory interlock, SysV key and segment id.
    pub shmem: Option<(u32, i32)>,
}

impl PidFile {
    pub fn parse(text: &str) -> PidFile {
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let line = |n: usize| lines.get(n - 1).copied().filter(|l| !l.is_empty());
        PidFile {
            pid: line(1).and_then(|l| l.parse::<i32>().ok()).filter(|p| *p > 0),
            data_dir: line(2).map(PathBuf::from),
            port: line(4).and_then(|l| l.parse().ok()),
            shmem: line(7).and_then(|l| {
                let mut parts = l.split_whitespace();
                // Written as two unsigned longs; key_t and the id are C ints.
                let key = parts.next()?.parse::<u64>().ok()? as u32;
                let id = i32::try_from(parts.next()?.parse::<u64>().ok()?).ok()?;
                Some((key, id))
            }),
        }
    }
}

/// Whether a process with the file's pid exists, as `kill(pid, 0)` and
/// `/proc/<pid>/stat` tell (neither needs ptrace rights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existence {
    /// `ESRCH`: no such process.
    Gone,
    /// Exited but not yet reaped by its parent: it runs nothing any more.
    Zombie,
    /// Exists (`kill` succeeded, or failed with `EPERM`: another user's).
    Running,
}

/// Where the process works. The postmaster and every backend `chdir` to the
/// data directory, so this is the proof of identity when it can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cwd {
    /// Same device and inode as the data directory.
    DataDir,
    Elsewhere(PathBuf),
    /// Not readable: why (permissions, hidden `/proc`, the process just went).
    Unreadable(String),
}

/// The shared-memory interlock of the file's 7th line, as `shmctl(IPC_STAT)` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shmem {
    /// The file has no 7th line (or it does not parse).
    NotRecorded,
    /// No segment with that id here (`EINVAL`/`EIDRM`): removed, or another IPC namespace.
    Gone,
    /// The id now belongs to a segment with another key.
    Reused,
    /// Still attached by this many processes: the postmaster or its backends run.
    Attached(u64),
    /// Exists, but no process is attached: everything that used it has exited.
    Detached,
    /// Exists but may not be inspected (`EACCES`: another user's segment).
    Unreadable(String),
}

/// Everything the judgement looks at, gathered without changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub file: PidFile,
    pub existence: Existence,
    /// `comm` of `/proc/<pid>/stat`; `None` when unreadable.
    pub name: Option<String>,
    /// `/proc/<pid>/cmdline`, split at NULs; `None` when unreadable.
    pub cmdline: Option<Vec<String>>,
    pub cwd: Cwd,
    /// Whether the command line's `-D` names this data directory; `None`
    /// when there is no absolute `-D` to compare (a backend, `PGDATA`).
    pub dash_d_is_data_dir: Option<bool>,
    pub shmem: Shmem,
}

/// The judgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A PostgreSQL runs on this directory: never touch the file.
    Live(String),
    /// Provably left over: the start removes it.
    Stale(String),
    /// The facts that would decide are unreadable: treated as [`Verdict::Live`].
    CannotTell(String),
}

impl Verdict {
    /// True unless the file is provably stale.
    pub fn treated_as_live(&self) -> bool {
        !matches!(self, Verdict::Stale(_))
    }

    pub fn reason(&self) -> &str {
        match self {
            Verdict::Live(r) | Verdict::Stale(r) | Verdict::CannotTell(r) => r,
        }
    }
}

/// A `postmaster.pid` found on disk, with the facts and the verdict.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub path: PathBuf,
    pub facts: Facts,
    pub verdict: Verdict,
}

impl Inspection {
    pub fn pid(&self) -> Option<i32> {
        self.facts.file.pid
    }
}

/// Whether the name or command line is PostgreSQL's (`postgres`, the old
/// `postmaster`, or a backend's `postgres: …` title).
fn looks_like_postgres(name: Option<&str>, cmdline: Option<&[String]>) -> Option<bool> {
    let by_name = name.map(|n| n == "postgres" || n == "postmaster");
    let by_cmdline = cmdline.filter(|c| !c.is_empty()).map(|c| {
        let argv0 = Path::new(&c[0]).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        argv0 == "postgres" || argv0 == "postmaster" || c[0].starts_with("postgres:")
    });
    match (by_name, by_cmdline) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(false) || b.unwrap_or(false)),
    }
}

/// The judgement over gathered facts; pure, so every rule is unit-tested.
///
/// In order: a file that names no process cannot be judged; shared memory
/// still attached means PostgreSQL processes still run (PostgreSQL's own
/// rule); a process that is gone left a stale file unless its shared memory
/// exists but cannot be inspected; a running process is judged by its
/// working directory when readable, else by its name (anything not called
/// postgres is a reused pid), else by the `-D` of its command line; what is
/// left cannot be told.
pub fn judge(f: &Facts) -> Verdict {
    let Some(pid) = f.file.pid else {
        return Verdict::CannotTell(
            "its first line is not a process id (an empty or half-written file: a PostgreSQL may be starting right now)".into(),
        );
    };
    let name = f.name.as_deref().unwrap_or("?");
    if let Shmem::Attached(n) = f.shmem {
        return Verdict::Live(match f.existence {
            Existence::Running => format!("PostgreSQL (pid {pid}) is already running on this directory: its shared memory is attached by {n} process(es)"),
            _ => format!("PostgreSQL pid {pid} has exited, but {n} of its server processes still hold its shared memory"),
        });
    }
    match f.existence {
        Existence::Gone | Existence::Zombie => {
            let gone = if f.existence == Existence::Gone { "no longer exists" } else { "has exited" };
            if let Shmem::Unreadable(why) = &f.shmem {
                return Verdict::CannotTell(format!(
                    "pid {pid} {gone}, but the shared memory it recorded still exists and cannot be inspected ({why}): its server processes may still run"
                ));
            }
            Verdict::Stale(format!("pid {pid} {gone}"))
        }
        Existence::Running => {
            let is_postgres = looks_like_postgres(f.name.as_deref(), f.cmdline.as_deref());
            match (&f.cwd, is_postgres) {
                (Cwd::DataDir, Some(false)) => {
                    Verdict::Stale(format!("pid {pid} is now `{name}`, not PostgreSQL (the pid was reused), though it works in this directory"))
                }
                (Cwd::DataDir, _) => Verdict::Live(format!("PostgreSQL (pid {pid}) is already running on this directory")),
                (Cwd::Elsewhere(cwd), _) => Verdict::Stale(format!(
                    "pid {pid} is now `{name}` working in {}, not a PostgreSQL of this directory (the pid was reused)",
                    cwd.display()
                )),
                (Cwd::Unreadable(_), Some(false)) => {
                    Verdict::Stale(format!("pid {pid} is now `{name}`, not PostgreSQL (the pid was reused)"))
                }
                (Cwd::Unreadable(_), _) if f.dash_d_is_data_dir == Some(true) => {
                    Verdict::Live(format!("PostgreSQL (pid {pid}) is already running with -D this directory"))
                }
                (Cwd::Unreadable(why), _) => Verdict::CannotTell(format!(
                    "pid {pid} is a running `{name}` whose data directory cannot be read ({why}), and nothing else readable proves it is not this directory's PostgreSQL"
                )),
            }
        }
    }
}

impl Facts {
    /// Reads what can be read about the file's process and shared memory.
    pub fn gather(file: PidFile, data_dir: &Path) -> Facts {
        let Some(pid) = file.pid else {
            return Facts {
                file,
                existence: Existence::Gone,
                name: None,
                cmdline: None,
                cwd: Cwd::Unreadable("no pid".into()),
                dash_d_is_data_dir: None,
                shmem: Shmem::NotRecorded,
            };
        };
        let shmem = file.shmem.map_or(Shmem::NotRecorded, |(key, id)| shmem_state(key, id));
        let dir = std::fs::metadata(data_dir).ok().map(|m| (m.dev(), m.ino()));
        let same_dir = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino())) == dir && dir.is_some();

        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let (name, state) = match stat.as_deref().and_then(parse_stat) {
            Some((n, s)) => (Some(n), Some(s)),
            None => (None, None),
        };
        let existence = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Err(nix::errno::Errno::ESRCH) => Existence::Gone,
            _ if state == Some('Z') || state == Some('X') => Existence::Zombie,
            _ => Existence::Running,
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok().filter(|c| !c.is_empty()).map(|c| {
            c.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect::<Vec<_>>()
        });
        let cwd_link = format!("/proc/{pid}/cwd");
        let cwd = match std::fs::metadata(&cwd_link) {
            Ok(_) if same_dir(Path::new(&cwd_link)) => Cwd::DataDir,
            Ok(_) => Cwd::Elsewhere(std::fs::read_link(&cwd_link).unwrap_or_else(|_| PathBuf::from("?"))),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Cwd::Unreadable(
                "reading another user's /proc/<pid>/cwd needs ptrace rights (CAP_SYS_PTRACE), which containers drop".into(),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && stat.is_none() => {
                Cwd::Unreadable("the process is not visible in /proc (hidepid, ProtectProc=, or another PID namespace)".into())
            }
            Err(e) => Cwd::Unreadable(format!("/proc/{pid}/cwd: {e}")),
        };
        let dash_d_is_data_dir = cmdline.as_deref().and_then(dash_d).filter(|p| p.is_absolute()).map(|p| same_dir(&p));
        Facts { file, existence, name, cmdline, cwd, dash_d_is_data_dir, shmem }
    }
}

/// `comm` and state from `/proc/<pid>/stat` ("pid (comm) S ppid …"; comm may hold spaces and parentheses).
fn parse_stat(stat: &str) -> Option<(String, char)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let state = stat.get(close + 1..)?.trim_start().chars().next()?;
    Some((name, state))
}

/// The `-D` argument of a postmaster's command line (`-D dir` or `-Ddir`).
fn dash_d(cmdline: &[String]) -> Option<PathBuf> {
    let mut args = cmdline.iter().skip(1);
    while let Some(a) = args.next() {
        if a == "-D" {
            return args.next().map(PathBuf::from);
        }
        if let Some(rest) = a.strip_prefix("-D") {
            return Some(PathBuf::from(rest));
        }
    }
    None
}

/// `shmctl(IPC_STAT)` on the recorded segment, read as the postmaster reads
/// it at start (`PGSharedMemoryIsInUse`).
fn shmem_state(key: u32, id: i32) -> Shmem {
    // SAFETY: IPC_STAT only writes into the zeroed struct we own.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) };
    if rc == 0 {
        if ds.shm_perm.__key as u32 != key {
            Shmem::Reused
        } else if ds.shm_nattch > 0 {
            Shmem::Attached(ds.shm_nattch as u64)
        } else {
            Shmem::Detached
        }
    } else {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::EIDRM) => Shmem::Gone,
            // Root without CAP_IPC_OWNER (a container's) may not stat the
            // postgres user's segment; the world-readable list still shows it.
            _ => match std::fs::read_to_string("/proc/sysvipc/shm").ok().and_then(|t| sysvipc_entry(&t, id)) {
                Some((k, _)) if k != key => Shmem::Reused,
                Some((_, 0)) => Shmem::Detached,
                Some((_, n)) => Shmem::Attached(n),
                None => Shmem::Unreadable(format!("shared memory id {id}: {e}")),
            },
        }
    }
}

/// Key and attach count of segment `id` in `/proc/sysvipc/shm`
/// ("key shmid perms size cpid lpid nattch …", key in decimal).
fn sysvipc_entry(table: &str, id: i32) -> Option<(u32, u64)> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1)?.parse::<i32>().ok()? == id).then_some(())?;
        Some((f.first()?.parse::<i64>().ok()? as u32, f.get(6)?.parse().ok()?))
    })
}

/// Reads and judges `<dir>/postmaster.pid`; `None` when there is none.
pub fn inspect(dir: &Path) -> Option<Inspection> {
    let path = dir.join("postmaster.pid");
    let text = match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            let facts = Facts::gather(PidFile::default(), dir);
            let verdict = Verdict::CannotTell(format!("the file cannot be read ({e})"));
            return Some(Inspection { path, facts, verdict });
        }
    };
    let facts = Facts::gather(PidFile::parse(&text), dir);
    let verdict = judge(&facts);
    Some(Inspection { path, facts, verdict })
}

/// The port of the PostgreSQL running on `data_dir` (a one-shot command
/// asks the running gateway's cluster), from its `postmaster.pid`.
pub fn running_port(data_dir: &Path) -> Result<u16> {
    let not_running = || {
        anyhow::anyhow!(
            "the gateway is not running (no PostgreSQL on {}); start it first with `omni-gateway`, then run this command again",
            data_dir.display()
        )
    };
    let pid_file = data_dir.join("postmaster.pid");
    let text = match std::fs::read_to_string(&pid_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_running()),
        Err(e) => return Err(e).with_context(|| format!("reading {} (run this as the user that runs the gateway)", pid_file.display())),
    };
    let file = PidFile::parse(&text);
    let pid = file.pid.ok_or_else(not_running)?;
    // Signal 0 only checks that the process exists; EPERM means it does.
    let alive = matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Ok(()) | Err(nix::errno::Errno::EPERM));
    if !alive {
        return Err(not_running());
    }
    file.port.ok_or_else(|| anyhow::anyhow!("{} names no port yet; retry in a moment", pid_file.display()))
}

/// What an operator should do about a file that is (treated as) live.
pub fn advice(inspection: &Inspection) -> String {
    let pid = inspection.pid().map_or("?".to_string(), |p| p.to_string());
    match inspection.verdict {
        Verdict::Live(_) => "Stop that server (or the gateway that runs it) first, or use another PGSERVE_DATA_DIR".to_string(),
        _ => format!(
            "It is treated as running, because removing the file of a live server corrupts its data. \
             If no PostgreSQL runs on this directory (check with `ps -p {pid} -o pid,user,args` where it ran, e.g. inside its container), \
             remove {} and start again",
            inspection.path.display()
        ),
    }
}

/// The start's rule: refuses when a PostgreSQL runs (or may run) on `dir`,
/// removes the file when it is provably stale.
pub fn clear_stale(dir: &Path) -> Result<()> {
    let Some(mut inspection) = inspect(dir) else { return Ok(()) };
    if inspection.facts.existence != Existence::Running && matches!(inspection.facts.shmem, Shmem::Attached(_)) {
        let ended = end_adopted_orphans(dir);
        if !ended.is_empty() {
            tracing::warn!(
                "PostgreSQL pid {} is gone but left server processes running in {}: ended {ended:?} (they can never serve again)",
                inspection.pid().map_or("?".to_string(), |p| p.to_string()),
                dir.display()
            );
            // They detach from the shared memory as they exit: at once.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while matches!(inspection.facts.shmem, Shmem::Attached(_)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
                match inspect(dir) {
                    Some(i) => inspection = i,
                    None => return Ok(()),
                }
            }
        }
    }
    match &inspection.verdict {
        Verdict::Stale(reason) => {
            tracing::warn!("removing stale {} ({reason})", inspection.path.display());
            std::fs::remove_file(&inspection.path).with_context(|| format!("could not remove stale {}", inspection.path.display()))
        }
        Verdict::Live(reason) => bail!(
            "{}: {reason}; refusing to start a second one on the same data directory. {}",
            inspection.path.display(),
            advice(&inspection)
        ),
        Verdict::CannotTell(reason) => bail!(
            "{} may belong to a running PostgreSQL: {reason}. {}",
            inspection.path.display(),
            advice(&inspection)
        ),
    }
}

/// Ends (SIGKILL) the server processes of a postmaster that died: each
/// runs in its own process group (PostgreSQL makes every child a group
/// leader), so the supervisor's group kill misses them, and a startup
/// process in crash recovery, or a backend that was asking for a
/// checkpoint, can outlive its postmaster by a minute. Only processes the
/// gateway adopted (it is their subreaper, or PID 1; not a child it started
/// itself) that are called `postgres` are touched: server processes of a
/// postmaster this gateway started, which can never serve again. Those that
/// work in another directory are left alone; where the working directory
/// cannot be read (root without `CAP_SYS_PTRACE`, in a container), those of
/// the account that owns `dir`. Returns their pids.
fn end_adopted_orphans(dir: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let me = std::process::id().to_string();
    let Ok(dir) = dir.canonicalize() else { return Vec::new() };
    let Ok(owner) = std::fs::metadata(&dir).map(|m| m.uid().to_string()) else { return Vec::new() };
    let mut ended = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("").to_string();
        if field("PPid:") != me || field("Name:") != "postgres" || crate::process::child::is_own_child(pid as u32) {
            continue;
        }
        let ours = match std::fs::read_link(format!("/proc/{pid}/cwd")) {
            Ok(cwd) => cwd == dir,
            // "Uid:" is real, effective, saved, filesystem: the real one.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => field("Uid:").split_whitespace().next() == Some(owner.as_str()),
            Err(_) => false,
        };
        if ours && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).is_ok() {
            ended.push(pid);
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(name: &str, cwd: Cwd) -> Facts {
        Facts {
            file: PidFile { pid: Some(26), data_dir: None, port: Some(5432), shmem: Some((5432001, 3)) },
            existence: Existence::Running,
            name: Some(name.into()),
            cmdline: Some(vec![format!("/usr/lib/postgresql/15/bin/{name}")]),
            cwd,
            dash_d_is_data_dir: None,
            shmem: Shmem::Gone,
        }
    }

    fn no_ptrace() -> Cwd {
        Cwd::Unreadable("permission denied".into())
    }

    #[test]
    fn parses_the_lines_postgres_writes() {
        let text = "26\n/var/lib/omni/data/postgres\n1764000000\n5432\n/tmp/omni-pg-1-abc\n127.0.0.1\n  5432001         3\nready   \n";
        let f = PidFile::parse(text);
        assert_eq!(f.pid, Some(26));
        assert_eq!(f.data_dir.as_deref(), Some(Path::new("/var/lib/omni/data/postgres")));
        assert_eq!(f.port, Some(5432));
        assert_eq!(f.shmem, Some((5432001, 3)));
        assert_eq!(PidFile::parse("").pid, None);
        assert_eq!(PidFile::parse("-3\n").pid, None);
        assert_eq!(PidFile::parse("26\n").shmem, None);
    }

    #[test]
    fn an_empty_or_half_written_file_cannot_be_told() {
        let f = Facts { file: PidFile::default(), ..running("postgres", no_ptrace()) };
        assert!(matches!(judge(&f), Verdict::CannotTell(_)));
    }

    #[test]
    fn a_gone_process_is_stale_unless_its_shared_memory_is_still_in_use() {
        let gone = Facts { existence: Existence::Gone, name: None, cmdline: None, cwd: Cwd::Unreadable("gone".into()), ..running("postgres", Cwd::DataDir) };
        assert!(matches!(judge(&gone), Verdict::Stale(r) if r.contains("no longer exists")));
        assert!(matches!(judge(&Facts { shmem: Shmem::Detached, ..gone.clone() }), Verdict::Stale(_)));
        assert!(matches!(judge(&Facts { shmem: Shmem::Reused, ..gone.clone() }), Verdict::Stale(_)));
        assert!(matches!(judge(&Facts { shmem: Shmem::NotRecorded, ..gone.clone() }), Verdict::Stale(_)));
        // Orphaned backends still attached: PostgreSQL itself would refuse.
        assert!(matches!(judge(&Facts { shmem: Shmem::Attached(4), ..gone.clone() }), Verdict::Live(r) if r.contains("4 of its server processes")));
        assert!(matches!(judge(&Facts { shmem: Shmem::Unreadable("EACCES".into()), ..gone.clone() }), Verdict::CannotTell(_)));
        let zombie = Facts { existence: Existence::Zombie, ..gone };
        assert!(matches!(judge(&zombie), Verdict::Stale(r) if r.contains("has exited")));
    }

    #[test]
    fn a_postgres_working_in_the_data_directory_is_live() {
        assert!(matches!(judge(&running("postgres", Cwd::DataDir)), Verdict::Live(_)));
    }

    #[test]
    fn a_reused_pid_is_stale_when_its_cwd_or_its_name_proves_it() {
        let elsewhere = running("postgres", Cwd::Elsewhere("/srv/other".into()));
        assert!(matches!(judge(&elsewhere), Verdict::Stale(r) if r.contains("/srv/other")));
        assert!(matches!(judge(&running("bash", Cwd::DataDir)), Verdict::Stale(_)));
        // No ptrace rights: the name alone proves a reused pid.
        assert!(matches!(judge(&running("omni-api", no_ptrace())), Verdict::Stale(r) if r.contains("omni-api")));
    }

    #[test]
    fn without_ptrace_rights_a_postgres_is_live_by_its_dash_d_or_its_shared_memory() {
        let by_arg = Facts { dash_d_is_data_dir: Some(true), ..running("postgres", no_ptrace()) };
        assert!(matches!(judge(&by_arg), Verdict::Live(_)));
        let by_shm = Facts { shmem: Shmem::Attached(7), ..running("postgres", no_ptrace()) };
        assert!(matches!(judge(&by_shm), Verdict::Live(_)));
    }

    #[test]
    fn without_ptrace_rights_anything_else_cannot_be_told_and_is_treated_as_live() {
        // The bug this module fixes: "cannot read cwd" used to mean "stale".
        let v = judge(&running("postgres", no_ptrace()));
        assert!(matches!(v, Verdict::CannotTell(_)), "{v:?}");
        assert!(v.treated_as_live());
        let other_dir = Facts { dash_d_is_data_dir: Some(false), ..running("postgres", no_ptrace()) };
        assert!(judge(&other_dir).treated_as_live());
        let invisible = Facts { name: None, cmdline: None, ..running("postgres", no_ptrace()) };
        assert!(matches!(judge(&invisible), Verdict::CannotTell(_)));
    }

    #[test]
    fn attached_shared_memory_wins_over_a_cwd_elsewhere() {
        let f = Facts { shmem: Shmem::Attached(2), ..running("bash", Cwd::Elsewhere("/".into())) };
        assert!(matches!(judge(&f), Verdict::Live(_)));
    }

    #[test]
    fn reads_a_segment_from_proc_sysvipc_shm() {
        let table = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                       5432001          3   600                    56    43    61      0   100   101   100   101 1764078000 1764078001 1764077990                  4096                     0\n";
        assert_eq!(sysvipc_entry(table, 3), Some((5432001, 0)));
        assert_eq!(sysvipc_entry(table, 4), None);
    }

    #[test]
    fn reads_name_and_state_from_proc_stat() {
        assert_eq!(parse_stat("26 (postgres) S 1 26 26 0"), Some(("postgres".into(), 'S')));
        assert_eq!(parse_stat("7 (a (b) c) Z 1"), Some(("a (b) c".into(), 'Z')));
        assert_eq!(dash_d(&["postgres".into(), "-D".into(), "/d".into()]), Some(PathBuf::from("/d")));
        assert_eq!(dash_d(&["postgres".into(), "-D/d".into()]), Some(PathBuf::from("/d")));
        assert_eq!(dash_d(&["postgres: checkpointer".into()]), None);
    }

    /// The facts as an unprivileged user gathers them about root's
    /// processes: `/proc/<pid>/cwd` is unreadable to it, exactly as a
    /// container's root without `CAP_SYS_PTRACE` finds the postgres user's.
    /// The judgement runs in this test executable re-run as `nobody`
    /// ([`unprivileged_judgement_helper`]), one line of output per pid.
    #[test]
    fn a_checker_without_ptrace_rights_never_judges_a_running_postgres_stale() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("not run: needs root to run the checker as another user (CI runs as root)");
            return;
        }
        let base = std::env::temp_dir().join(format!("omni-pidfile-test-{}", std::process::id()));
        let data = base.join("data");
        std::fs::create_dir_all(&data).unwrap();
        // A stand-in postmaster: a script called `postgres` is `postgres` in /proc/<pid>/stat.
        let fake = base.join("postgres");
        std::fs::write(&fake, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
        for p in [&base, &data, &fake] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // Each in a process group of its own, killed whole: the stand-in's
        // `sleep 1` would otherwise outlive the test.
        struct Kill(Vec<std::process::Child>);
        impl Drop for Kill {
            fn drop(&mut self) {
                for c in &mut self.0 {
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGKILL);
                    let _ = c.wait();
                }
            }
        }
        let spawn = |cmd: &mut Command| cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn().unwrap();
        let procs = Kill(vec![
            // PostgreSQL with -D this directory, working in `/` as far as anyone can see.
            spawn(Command::new(&fake).arg("-D").arg(&data).current_dir("/")),
            // PostgreSQL started with PGDATA (no -D), working in the data directory.
            spawn(Command::new(&fake).current_dir(&data)),
            // A reused pid: some other program, in the data directory.
            spawn(Command::new("sleep").arg("600").current_dir(&data)),
        ]);
        let pids: Vec<String> = procs.0.iter().map(|c| c.id().to_string()).collect();
        // The script's comm is only `postgres` once the kernel has exec'd it.
        for pid in &pids[..2] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap()).map(|s| s.0) != Some("postgres".into()) {
                assert!(std::time::Instant::now() < deadline, "the stand-in postgres did not start");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "pg::pidfile::tests::unprivileged_judgement_helper", "--ignored", "--nocapture", "--test-threads=1"])
            .env("OMNI_PIDFILE_HELPER", format!("{}:{}", data.display(), pids.join(",")))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        drop(procs);
        let _ = std::fs::remove_dir_all(&base);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let verdicts: Vec<&str> = stdout.lines().filter_map(|l| l.split_once("verdict ").map(|(_, v)| v)).collect();
        assert_eq!(verdicts.len(), 3, "helper output:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(verdicts.iter().all(|v| v.contains("cwd unreadable")), "the checker must not read root's cwd: {verdicts:?}");
        assert!(verdicts[0].starts_with("live"), "{verdicts:?}");
        assert!(verdicts[1].starts_with("cannot-tell"), "{verdicts:?}");
        assert!(verdicts[2].starts_with("stale") && verdicts[2].contains("`sleep`"), "{verdicts:?}");
    }

    /// Run by the test above as `nobody`; does nothing when run directly.
    #[test]
    #[ignore = "run by a_checker_without_ptrace_rights_never_judges_a_running_postgres_stale as another user"]
    fn unprivileged_judgement_helper() {
        let Ok(arg) = std::env::var("OMNI_PIDFILE_HELPER") else { return };
        let (dir, pids) = arg.rsplit_once(':').unwrap();
        for pid in pids.split(',') {
            let facts = Facts::gather(PidFile { pid: pid.parse().ok(), ..PidFile::default() }, Path::new(dir));
            let kind = match judge(&facts) {
                Verdict::Live(_) => "live",
                Verdict::Stale(_) => "stale",
                Verdict::CannotTell(_) => "cannot-tell",
            };
            let cwd = if matches!(facts.cwd, Cwd::Unreadable(_)) { "cwd unreadable" } else { "cwd READ" };
            println!("verdict {kind} ({cwd}): {}", judge(&facts).reason());
        }
    }

    #[test]
    fn our_own_process_with_the_files_pid_is_judged_from_real_facts() {
        // This test process works in its crate directory, not in a data directory.
        let dir = std::env::temp_dir();
        let me = PidFile { pid: Some(std::process::id() as i32), ..PidFile::default() };
        let facts = Facts::gather(me, &dir);
        assert_eq!(facts.existence, Existence::Running);
        assert!(matches!(facts.cwd, Cwd::Elsewhere(_)), "{facts:?}");
        assert!(matches!(judge(&facts), Verdict::Stale(_)));
    }
}
