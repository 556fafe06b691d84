//! `omni-gateway`: the one process a user starts. It runs an embedded
//! PostgreSQL and the API worker as supervised children and serves both the
//! browser and API clients on one port.
//!
//! Reading order follows the life of the process: [`config`] → [`postgres`]
//! → [`supervisor`] (with [`child`] and [`status`]) → [`http`]; [`app`] wires
//! them together.

pub mod app;
pub mod child;
pub mod config;
pub mod http;
pub mod logging;
pub mod postgres;
pub mod privilege;
pub mod status;
pub mod supervisor;
