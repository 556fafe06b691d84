//! The two pieces that make a child process die with its parent, shared by
//! the gateway's spawner (`omni_gateway::process::child`) and the backup
//! tools the worker and the command line run ([`crate::backups`]).
//!
//! * **Forked from a thread that lives as long as the process.**
//!   `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//!   not the process. Tokio's blocking threads, a `spawn_blocking` pool or a
//!   short-lived helper thread come and go, so children are forked from one
//!   dedicated thread ([`on_lasting_thread`]) that lives until the process
//!   ends. A job that panics there is caught: the thread, and with it every
//!   child it forked, lives on.
//! * **Armed in the child, then checked** ([`arm_parent_death`], called in a
//!   `pre_exec` hook after any change of uid, which clears the signal): the
//!   parent check closes the race where the parent died between `fork` and
//!   `prctl`.

use std::io;
use std::sync::{mpsc, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

static LASTING: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

/// Runs `job` on the process's one lasting thread (started on first use) and
/// returns at once; the job replies through a channel of its own.
pub fn on_lasting_thread(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let sender = LASTING.get_or_init(|| Mutex::new(start_lasting_thread()));
    sender.lock().unwrap_or_else(|e| e.into_inner()).send(Box::new(job)).map_err(|_| io::Error::other("the child-spawner thread is gone"))
}

fn start_lasting_thread() -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("child-spawner".into())
        .spawn(move || {
            for job in rx {
                // A job's panic must not end the thread: its children
                // would all get their parent-death signal.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })
        .expect("cannot start the child-spawner thread");
    tx
}

/// Spawns `command` from the lasting thread, in the caller's tokio runtime
/// (its process driver reaps the child). The command should carry a
/// `pre_exec` hook that calls [`arm_parent_death`] (see [`die_with_parent`]).
pub async fn spawn(mut command: tokio::process::Command) -> io::Result<tokio::process::Child> {
    let handle = tokio::runtime::Handle::current();
    let (reply, answer) = tokio::sync::oneshot::channel();
    on_lasting_thread(move || {
        let _runtime = handle.enter();
        let spawned = command.spawn();
        // Nobody waits any more (the caller's future was dropped): the child
        // is dropped, which kills it when the command says kill_on_drop.
        let _ = reply.send(spawned);
    })?;
    answer.await.map_err(|_| io::Error::other("the child-spawner thread dropped the request"))?
}

/// Adds the `pre_exec` hook that arms `signal` as the child's parent-death
/// signal (see [`arm_parent_death`]).
pub fn die_with_parent(command: &mut tokio::process::Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook makes only async-signal-safe calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || arm_parent_death(signal, parent));
    }
}

/// For a `pre_exec` hook (after any uid change): asks for `signal` when the
/// forking thread ends, then exits at once if `parent` already died before
/// the signal was armed. Async-signal-safe: allocates nothing.
#[cfg(target_os = "linux")]
pub fn arm_parent_death(signal: libc::c_int, parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a plain integer; getppid and
    // _exit are async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    Ok(())
}

/// No equivalent outside Linux: the parents' own shutdown paths and kill on
/// drop are the fallback.
#[cfg(not(target_os = "linux"))]
pub fn arm_parent_death(_signal: libc::c_int, _parent: libc::pid_t) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child asked for by a thread that then ends (a retired blocking
    /// thread, a helper thread) keeps running: only the process's death
    /// counts. Forked from the asking thread itself, it would get SIGKILL
    /// as that thread exits.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_outlives_the_thread_that_asked_for_it() {
        let handle = tokio::runtime::Handle::current();
        let mut child = std::thread::spawn(move || {
            handle.block_on(async {
                let mut command = tokio::process::Command::new("sleep");
                command.arg("30").kill_on_drop(true);
                die_with_parent(&mut command, libc::SIGKILL);
                spawn(command).await.expect("sleep starts")
            })
        })
        .join()
        .unwrap();
        // The asking thread has ended; the child must still be running.
        let ended = tokio::time::timeout(std::time::Duration::from_millis(500), child.wait()).await;
        assert!(ended.is_err(), "the child ended with the thread that asked for it: {ended:?}");
        child.kill().await.unwrap();
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_end_the_lasting_thread() {
        on_lasting_thread(|| panic!("a job's panic")).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        on_lasting_thread(move || {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        })
        .unwrap();
        assert_eq!(rx.await.unwrap().as_deref(), Some("child-spawner"));
    }
}
