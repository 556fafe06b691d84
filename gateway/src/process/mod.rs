//! The OS layer: child processes (`child::spawn` for the supervised ones:
//! process group, parent-death signal, the unprivileged account, output
//! read line by line into the log; `child::output` and `output_blocking`
//! for short tools, through the same path with the same guarantees, their
//! output returned as data and their whole group killed when the call is
//! abandoned) and the accounts the gateway drops to. Imports nothing of the
//! crate (the fork itself is `omni_contract::children`'s, shared with the
//! worker's backup tools).

pub mod child;
pub mod privilege;
