//! The OS layer: child processes (`child::spawn` for the supervised ones:
//! process group, parent-death signal, the unprivileged account, output
//! read line by line into the log; `child::output` for short tools, which
//! does not yet give them all of that) and the accounts the gateway drops
//! to. Imports nothing of the crate.

pub mod child;
pub mod privilege;
