//! `omni-gateway`: the one process a user starts. It runs an embedded
//! PostgreSQL and the API worker as supervised children and serves both the
//! browser and API clients on one port.
//!
//! The modules are layers. Each may import the layers listed below it, never
//! one above it, and no two top-level modules import each other
//! (`layers_have_no_cycles` below fails on a new cycle):
//!
//! | layer | owns |
//! |---|---|
//! | [`cli`] | one-shot commands (`doctor`, `backup`, `restore`, `upgrade`, `import-sqlite`); never supervises |
//! | [`app`] | wiring: the stages in start order, shutdown in reverse |
//! | [`worker`] | the API worker's policy, its zero-downtime reload, dev-mode rebuilds |
//! | [`serve`] | the one listener: proxy, gateway endpoints, metrics, the log ring |
//! | [`relay`] | the logical replication relay |
//! | [`repository`] | the off-site repository: uploads to S3, GCS, Azure or a directory, restores from it |
//! | [`pitr`] | the WAL archive, base backups, restore to a time |
//! | [`pg`] | the embedded cluster: binaries, data directory, pid file, lock, upgrade, its policy |
//! | [`supervise`] | the mechanism: the restart loop, start gates, systemd notify; knows no PostgreSQL |
//! | [`status`] | the status board every layer reports to |
//! | [`process`] | the OS layer: child processes, accounts and privileges |
//! | [`tls`] | HTTPS: the certificate's checks and its replacement while serving |
//! | [`config`] | settings: variables, `.env`, the settings file |

pub mod app;
pub mod cli;
pub mod config;
pub mod pg;
pub mod pitr;
pub mod process;
pub mod relay;
pub mod repository;
pub mod serve;
pub mod status;
pub mod supervise;
pub mod tls;
pub mod worker;

#[cfg(test)]
mod layers;
#[cfg(test)]
mod testing;
