//! Development mode (`make dev`, `OMNI_DEV=true`): when the worker binary is
//! rebuilt, the running worker is swapped for the new one with the same
//! zero-downtime reload as SIGHUP. UI files need nothing: `make dev` sets
//! `OMNI_UI_DIR=./ui-dist`, so the worker reads them from disk on every
//! request instead of serving the copy built into it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::supervise::Command;

/// Watches `bin` (through its directory, since builds replace the file) and
/// sends `Reload` once writes to it have settled, until `stop`.
pub fn watch_worker_binary(bin: &Path, commands: mpsc::Sender<Command>, tasks: &TaskTracker, stop: CancellationToken) {
    let bin: PathBuf = bin.to_path_buf();
    let Some(dir) = bin.parent().map(Path::to_path_buf) else { return };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let target = bin.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event.paths.iter().any(|p| p == &target) && (event.kind.is_create() || event.kind.is_modify()) {
                let _ = tx.send(());
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("dev mode: cannot watch {}: {e}", bin.display());
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!("dev mode: cannot watch {}: {e}", dir.display());
        return;
    }
    tracing::info!("dev mode: the worker restarts when {} changes", bin.display());
    tasks.spawn(async move {
        let _watcher = watcher;
        let changes = async {
            while rx.recv().await.is_some() {
                // A build writes the file in several steps; wait for quiet.
                while let Ok(Some(())) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {}
                tracing::info!("dev mode: worker binary changed; reloading");
                if commands.send(Command::Reload).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = changes => {}
            _ = stop.cancelled() => {}
        }
    });
}
