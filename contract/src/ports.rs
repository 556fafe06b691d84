//! A free loopback port for a listener that is bound later, by someone
//! else (`PGSERVE_PORT=0`: PostgreSQL; the test kit: every port it hands
//! out).
//!
//! A port the kernel hands out for `bind(0)` is free again once the check
//! lets go of it, and the kernel may hand it out again at once: to the next
//! `bind(0)` (the gateway binds the worker's socket that way) or to an
//! outgoing connection. So the port is taken from below the kernel's
//! ephemeral range, where neither can take it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{Ipv4Addr, TcpListener};

/// A loopback port free now, below the ephemeral range when the machine
/// leaves room there (at least 1000 ports above 1024), from `bind(0)` otherwise.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let ephemeral_from: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let from = ephemeral_from.saturating_sub(12_000).max(1024);
    if from + 1000 <= ephemeral_from {
        let random = RandomState::new();
        for attempt in 0..200u32 {
            let port = from + (random.hash_one(attempt) % u64::from(ephemeral_from - from)) as u16;
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_never_comes_from_the_range_bind_0_hands_out() {
        let ephemeral_from: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap().split_whitespace().next().unwrap().parse().unwrap();
        for _ in 0..20 {
            let port = free_loopback_port().unwrap();
            assert!(port < ephemeral_from, "{port} is in the ephemeral range from {ephemeral_from}");
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}
