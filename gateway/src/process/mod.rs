//! The OS layer: child processes (one spawn path for long-running and
//! short commands: process group, parent-death signal, the unprivileged
//! account, output read line by line into the log) and the accounts the
//! gateway drops to. Imports nothing of the crate.

pub mod child;
pub mod privilege;
