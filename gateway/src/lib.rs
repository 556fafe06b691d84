//! `omni-gateway`: the one process a user starts. It runs an embedded
//! PostgreSQL and the API worker as supervised children and serves both the
//! browser and API clients on one port.
//!
//! Reading order follows the life of the process: [`config`] → [`postgres`]
//! → [`worker`] → [`supervisor`] (with [`child`] and [`status`]) → [`proxy`]
//! (with [`upstream`]) → [`http`] (with [`metrics`] and [`sd_notify`]);
//! [`app`] wires them together.

pub mod app;
pub mod backup_cli;
pub mod child;
pub mod config;
pub mod dev;
pub mod doctor;
pub mod external;
pub mod gateway_auth;
pub mod http;
pub mod internal;
pub mod import_cli;
// Seeing inside: the log ring, the metrics history, and their HTTP endpoints.
pub mod logring;
pub mod metrics_history;
pub mod observe;
pub mod metrics;
pub mod postgres;
pub mod privilege;
pub mod proxy;
pub mod replication;
pub mod sd_notify;
pub mod status;
pub mod supervisor;
pub mod upgrade_cli;
pub mod upstream;
pub mod worker;
// Point-in-time recovery: the WAL streamer, base backups, restore to a time.
pub mod restore_cli;
pub mod wal;
