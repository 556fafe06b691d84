//! The Omni API worker (SPEC §6): HTTP API over the PostgreSQL it owns the
//! schema of, plus the UI files.
//!
//! Its settings come from the gateway as a typed value
//! ([`omni_contract::worker_settings`]); so do the backup service and the error
//! shape. Reading order: [`db`] and [`migrations`] → [`server`] (start
//! and stop) → [`routes`] → one module per concern of the API ([`health`],
//! [`preferences`], [`setup`], [`backup_routes`], [`migration_check`] and
//! [`import_routes`], [`auth`], [`roles`], [`auth_check`], [`accounts`], [`sessions`], [`rate_limit`],
//! [`static_files`], [`openapi`]) → [`errors`], the shape of every failure.

pub mod accounts;
pub mod auth;
pub mod auth_check;
pub mod backup_routes;
pub mod db;
pub mod errors;
pub mod health;
pub mod import_routes;
pub mod lingering;
pub mod migration_check;
pub mod openapi;
pub mod pitr_routes;
pub mod preference_batches;
pub mod preferences;
pub mod rate_limit;
pub mod roles;
pub mod routes;
pub mod server;
pub mod sessions;
pub mod settings;
pub mod setup;
pub mod static_files;
