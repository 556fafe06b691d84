//! `omni-contract`: what `omni-gateway` and `omni-api` must agree on, in one
//! crate both depend on (the gateway depends on this, not on the worker).
//!
//! * [`worker_settings`]: the typed settings the gateway hands the worker
//!   through its environment, with the one validator both sides run;
//! * [`backups`]: the backup service, run by the worker's API and schedule
//!   and by `omni-gateway backup …` alike;
//! * [`import`]: the SQLite importer, run by the worker's API and by
//!   `omni-gateway import-sqlite` alike;
//! * [`migrations`]: the schema (`migrations/*.sql`, embedded), applied by
//!   the worker at start and by the gateway into its memory-mode template;
//! * [`error_body`]: the JSON error shape every HTTP client sees;
//! * [`children`]: forking children that die with their parent, for both;
//! * [`logging`], [`interval`], [`paths`], [`redact`], [`sqlite`], [`probe`]:
//!   small rules that must read the same on both sides.

pub mod backups;
pub mod children;
pub mod crypt;
pub mod error_body;
pub mod import;
pub mod interval;
pub mod leader;
pub mod logging;
pub mod migrations;
pub mod paths;
pub mod ports;
pub mod probe;
pub mod redact;
pub mod sqlite;
pub mod worker_settings;
