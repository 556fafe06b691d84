//! Brute-force limits on failed sign-ins and failed API-key checks.
//!
//! Two kinds of counters, both kept in this worker's memory:
//!
//! - **per client address** (see [`client_address`]): the first
//!   [`ADDRESS_FREE`] failures cost nothing; each one after that blocks the
//!   address for twice as long as the previous one (1 s, 2 s, 4 s, … up to
//!   [`ADDRESS_CAP`]). While blocked, every attempt from it is answered 429
//!   with `Retry-After`, without looking at the password or key at all, and
//!   is not counted anywhere.
//! - **per account** (and one for the API key): the same doubling, but only
//!   from the [`ACCOUNT_FREE`]th failure on, and never longer than
//!   [`ACCOUNT_CAP`].
//!
//! Why an attacker cannot lock the admin out for long: the per-address
//! limit dominates. One address is blocked after 10 failures, and its blocked
//! attempts do not count against the account, so from one address an
//! attacker never reaches the account's threshold of 20; the real admin, from
//! any other address, signs in at once. Only an attacker with many addresses
//! can trip the account limit, and then the account waits at most 30 s after
//! each of their failures. A success clears the counters of its address and
//! account. Counters are forgotten [`FORGET_AFTER`] after their last failure.
//!
//! Each worker counts on its own; with several workers an attacker's budget
//! is multiplied by their number (each still blocks on its own).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::HeaderMap;

pub const ADDRESS_FREE: u32 = 10;
pub const ADDRESS_CAP: Duration = Duration::from_secs(15 * 60);
pub const ACCOUNT_FREE: u32 = 20;
pub const ACCOUNT_CAP: Duration = Duration::from_secs(30);
pub const FORGET_AFTER: Duration = Duration::from_secs(30 * 60);
/// Above this many counters, expired ones are dropped before adding one.
const PRUNE_ABOVE: usize = 10_000;

/// The account name under which failed API-key checks are counted.
pub const API_KEY_ACCOUNT: &str = "\0api-key";

#[derive(Clone, PartialEq, Eq, Hash)]
enum Subject {
    Address(String),
    Account(String),
}

struct Entry {
    failures: u32,
    last_failure: Instant,
    blocked_until: Option<Instant>,
}

#[derive(Default)]
pub struct Limiter {
    entries: Mutex<HashMap<Subject, Entry>>,
}

/// How long the caller must wait before its next attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Blocked(pub Duration);

fn backoff(failures: u32, free: u32, cap: Duration) -> Option<Duration> {
    if failures <= free {
        return None;
    }
    let doublings = (failures - free - 1).min(20);
    Some(Duration::from_secs(1u64 << doublings).min(cap))
}

impl Limiter {
    /// Whether an attempt from `address` for `account` may be checked now.
    pub fn check(&self, address: &str, account: &str) -> Result<(), Blocked> {
        let now = Instant::now();
        let entries = self.entries.lock().expect("the limiter lock is never poisoned");
        let wait = [Subject::Address(address.to_owned()), Subject::Account(account.to_owned())]
            .iter()
            .filter_map(|s| entries.get(s))
            .filter_map(|e| e.blocked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max();
        match wait {
            Some(wait) => Err(Blocked(wait)),
            None => Ok(()),
        }
    }

    /// Counts a failed attempt.
    pub fn fail(&self, address: &str, account: &str) {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("the limiter lock is never poisoned");
        if entries.len() > PRUNE_ABOVE {
            entries.retain(|_, e| now.duration_since(e.last_failure) < FORGET_AFTER);
        }
        for (subject, free, cap) in [
            (Subject::Address(address.to_owned()), ADDRESS_FREE, ADDRESS_CAP),
            (Subject::Account(account.to_owned()), ACCOUNT_FREE, ACCOUNT_CAP),
        ] {
            let entry = entries.entry(subject).or_insert(Entry { failures: 0, last_failure: now, blocked_until: None });
            if now.duration_since(entry.last_failure) >= FORGET_AFTER {
                entry.failures = 0;
            }
            entry.failures += 1;
            entry.last_failure = now;
            entry.blocked_until = backoff(entry.failures, free, cap).map(|d| now + d);
        }
    }

    /// Clears the counters of a successful attempt.
    pub fn succeed(&self, address: &str, account: &str) {
        let mut entries = self.entries.lock().expect("the limiter lock is never poisoned");
        entries.remove(&Subject::Address(address.to_owned()));
        entries.remove(&Subject::Account(account.to_owned()));
    }
}

/// The address a request came from.
///
/// The worker listens on a socket only the gateway reaches (loopback or an
/// inherited descriptor), and the gateway appends the address of its own TCP
/// peer to `X-Forwarded-For` (gateway/src/proxy.rs). So the **last** entry of
/// that header is the one to trust: earlier entries are whatever the client
/// sent and prove nothing. Without the header (the worker reached directly,
/// as in tests), the TCP peer of the worker is the address. With a reverse
/// proxy in front of the gateway, every client shares the proxy's address.
pub fn client_address(headers: &HeaderMap, peer: Option<SocketAddr>) -> String {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .last()
        .and_then(|v| v.parse::<IpAddr>().ok());
    match (forwarded, peer) {
        (Some(ip), _) => ip.to_string(),
        (None, Some(peer)) => peer.ip().to_string(),
        (None, None) => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_after_ten_failures_with_doubling_waits() {
        assert_eq!(backoff(10, ADDRESS_FREE, ADDRESS_CAP), None);
        assert_eq!(backoff(11, ADDRESS_FREE, ADDRESS_CAP), Some(Duration::from_secs(1)));
        assert_eq!(backoff(13, ADDRESS_FREE, ADDRESS_CAP), Some(Duration::from_secs(4)));
        assert_eq!(backoff(60, ADDRESS_FREE, ADDRESS_CAP), Some(ADDRESS_CAP));
        assert_eq!(backoff(60, ACCOUNT_FREE, ACCOUNT_CAP), Some(ACCOUNT_CAP));
    }

    #[test]
    fn one_address_cannot_block_the_account_for_another() {
        let limiter = Limiter::default();
        for _ in 0..50 {
            if limiter.check("10.0.0.1", "admin").is_ok() {
                limiter.fail("10.0.0.1", "admin");
            }
        }
        assert!(limiter.check("10.0.0.1", "admin").is_err());
        assert!(limiter.check("10.0.0.2", "admin").is_ok());
    }

    #[test]
    fn the_last_forwarded_entry_is_the_address() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4, 127.0.0.7".parse().unwrap());
        assert_eq!(client_address(&headers, None), "127.0.0.7");
        assert_eq!(client_address(&HeaderMap::new(), Some("127.0.0.9:5".parse().unwrap())), "127.0.0.9");
    }
}
