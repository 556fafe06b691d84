//! Brute-force limits on failed sign-ins and failed API-key checks.
//!
//! Two kinds of counters, both kept in this worker's memory:
//!
//! - **per client address** (see [`client_address`]; IPv6 addresses are
//!   grouped by their /64, which one subscriber usually holds whole): the
//!   first [`ADDRESS_FREE`] failures cost nothing; each one after that
//!   blocks the address for twice as long as the previous one (1 s, 2 s,
//!   4 s, … up to [`ADDRESS_CAP`]). While blocked, every password sign-in
//!   from it is answered 429 with `Retry-After`, without looking at the
//!   password, and is not counted anywhere.
//! - **per account** (password sign-ins only): the same doubling, but only
//!   from the [`ACCOUNT_FREE`]th failure on, and never longer than
//!   [`ACCOUNT_CAP`].
//!
//! An attempt is counted as a failure the moment it is let through
//! ([`Limiter::attempt`]), before anything is awaited, and refunded when it
//! turns out right ([`Limiter::succeeded`]). So a burst of N parallel
//! guesses counts N, and the attempts past the address's budget are
//! refused at once, however many are in flight.
//!
//! A success refunds its own attempt at its address and clears the counter
//! of *its* account only: it never clears an address's failures, so an
//! attacker holding a valid account cannot wash their address clean by
//! signing in between guesses.
//!
//! The API key is not a password: it has 256 bits, so guessing it is
//! hopeless, and a *correct* key is never throttled (the caller checks the
//! key first and only counts a wrong one). Wrong keys count against their
//! address only (so spraying keys spends that address's sign-in budget);
//! there is no counter for "the API key" that strangers could fill. On a
//! protected route a wrong key is answered 401 even from a blocked address
//! (a 429 would tell a guesser nothing more); a sign-in with a wrong
//! `api_key` from a blocked address gets the sign-in's 429.
//!
//! What an attacker can still do: from one address, 10 free guesses, then
//! ever slower ones (at most one per 15 min); with many addresses, slow
//! down sign-ins of one account to one attempt per [`ACCOUNT_CAP`] after
//! each of their failures, never longer; the real owner's attempts are not
//! blocked by any address counter but their own. Counters are forgotten
//! [`FORGET_AFTER`] after their last failure.
//!
//! Each worker counts on its own; with several workers an attacker's budget
//! is multiplied by their number (each still blocks on its own).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
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

/// The one header the worker reads the client's address from. The gateway
/// always sets it (dropping any copy the client sent) to the address it
/// believes: its TCP peer, or, when that peer is one of
/// `OMNI_TRUSTED_PROXIES`, what that proxy says in `X-Forwarded-For`
/// (gateway/src/proxy.rs).
pub const CLIENT_ADDR_HEADER: &str = "x-omni-client-addr";

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

fn limits(subject: &Subject) -> (u32, Duration) {
    match subject {
        Subject::Address(_) => (ADDRESS_FREE, ADDRESS_CAP),
        Subject::Account(_) => (ACCOUNT_FREE, ACCOUNT_CAP),
    }
}

fn subjects(address: &str, account: Option<&str>) -> Vec<Subject> {
    let mut subjects = vec![Subject::Address(address.to_owned())];
    subjects.extend(account.map(|a| Subject::Account(a.to_owned())));
    subjects
}

impl Limiter {
    /// Lets an attempt from `address` (for `account`, when it names one)
    /// through and counts it as a failure at once, or says how long to wait
    /// when either is blocked (then nothing is counted). Call
    /// [`Limiter::succeeded`] when the attempt turns out right.
    pub fn attempt(&self, address: &str, account: Option<&str>) -> Result<(), Blocked> {
        let now = Instant::now();
        let subjects = subjects(address, account);
        let mut entries = self.entries.lock().expect("the limiter lock is never poisoned");
        let wait = subjects
            .iter()
            .filter_map(|s| entries.get(s))
            .filter(|e| now.duration_since(e.last_failure) < FORGET_AFTER)
            .filter_map(|e| e.blocked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max();
        if let Some(wait) = wait {
            return Err(Blocked(wait));
        }
        if entries.len() > PRUNE_ABOVE {
            entries.retain(|_, e| now.duration_since(e.last_failure) < FORGET_AFTER);
        }
        for subject in subjects {
            let (free, cap) = limits(&subject);
            let entry = entries.entry(subject).or_insert(Entry { failures: 0, last_failure: now, blocked_until: None });
            if now.duration_since(entry.last_failure) >= FORGET_AFTER {
                entry.failures = 0;
            }
            entry.failures += 1;
            entry.last_failure = now;
            entry.blocked_until = backoff(entry.failures, free, cap).map(|d| now + d);
        }
        Ok(())
    }

    /// The attempt [`Limiter::attempt`] let through was right: it is taken
    /// back from its address's count (other failures of that address stay),
    /// and its account's counter starts over.
    pub fn succeeded(&self, address: &str, account: Option<&str>) {
        self.refund(address, None);
        if let Some(account) = account {
            self.entries.lock().expect("the limiter lock is never poisoned").remove(&Subject::Account(account.to_owned()));
        }
    }

    /// The attempt could not be checked (the database failed): it is taken
    /// back from its address's and account's counts, as if never made.
    pub fn refund(&self, address: &str, account: Option<&str>) {
        let mut entries = self.entries.lock().expect("the limiter lock is never poisoned");
        for subject in subjects(address, account) {
            let (free, _) = limits(&subject);
            if let Some(entry) = entries.get_mut(&subject) {
                entry.failures = entry.failures.saturating_sub(1);
                if entry.failures <= free {
                    entry.blocked_until = None;
                }
                if entry.failures == 0 {
                    entries.remove(&subject);
                }
            }
        }
    }
}

/// The address a request came from, as the limiter keys it.
///
/// The worker listens on a socket only the gateway reaches (loopback or a
/// descriptor the gateway hands it), and the gateway always overwrites
/// [`CLIENT_ADDR_HEADER`] with the client address it believes. That is
/// the only reason this header can be trusted here; `X-Forwarded-For` is
/// never read (any client can write it). Without the header (the worker
/// reached directly, as in tests), the worker's TCP peer is the address.
/// An IPv6 address stands for its /64.
pub fn client_address(headers: &HeaderMap, peer: Option<SocketAddr>) -> String {
    let told = headers.get(CLIENT_ADDR_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<IpAddr>().ok());
    match told.or(peer.map(|p| p.ip())) {
        Some(ip) => group(ip),
        None => "unknown".to_owned(),
    }
}

/// IPv4 as is; IPv6 as its /64 (an IPv4-mapped one as the IPv4 address).
fn group(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        // ::1 stays itself: it is one host, and the setup gate asks whether a
        // request came from loopback (roles.rs).
        IpAddr::V6(v6) if v6.is_loopback() => v6.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
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
    fn attempts_in_flight_count_before_they_finish() {
        let limiter = Limiter::default();
        // Nobody has finished yet: all are let through or refused now.
        let through = (0..50).filter(|_| limiter.attempt("10.0.0.1", Some("account:admin")).is_ok()).count();
        assert_eq!(through, ADDRESS_FREE as usize + 1);
    }

    #[test]
    fn one_address_cannot_block_the_account_for_another() {
        let limiter = Limiter::default();
        for _ in 0..50 {
            let _ = limiter.attempt("10.0.0.1", Some("account:admin"));
        }
        assert!(limiter.attempt("10.0.0.1", Some("account:admin")).is_err());
        assert!(limiter.attempt("10.0.0.2", Some("account:admin")).is_ok());
    }

    #[test]
    fn a_success_refunds_only_its_own_attempt() {
        let limiter = Limiter::default();
        for i in 0..ADDRESS_FREE {
            limiter.attempt("10.0.0.1", Some(&format!("account:guess{i}"))).unwrap();
        }
        // A valid low-privilege sign-in from the same address in between...
        limiter.attempt("10.0.0.1", Some("account:mallory")).unwrap();
        limiter.succeeded("10.0.0.1", Some("account:mallory"));
        // ...does not wash the address: the next failure blocks it.
        limiter.attempt("10.0.0.1", Some("account:guess")).unwrap();
        assert!(limiter.attempt("10.0.0.1", Some("account:guess")).is_err());
        // And a success elsewhere never touches this address.
        limiter.attempt("10.0.0.2", None).unwrap();
        limiter.succeeded("10.0.0.2", None);
        assert!(limiter.attempt("10.0.0.1", None).is_err());
    }

    #[test]
    fn an_attempt_the_database_could_not_check_is_refunded_whole() {
        let limiter = Limiter::default();
        for _ in 0..50 {
            limiter.attempt("10.0.0.3", Some("account:admin")).unwrap();
            limiter.refund("10.0.0.3", Some("account:admin"));
        }
        assert!(limiter.entries.lock().unwrap().is_empty());
    }

    #[test]
    fn the_gateway_header_is_the_address_and_ipv6_counts_per_64() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        let peer = Some("127.0.0.9:5".parse().unwrap());
        assert_eq!(client_address(&headers, peer), "127.0.0.9", "X-Forwarded-For is never read");
        headers.insert(CLIENT_ADDR_HEADER, "203.0.113.7".parse().unwrap());
        assert_eq!(client_address(&headers, peer), "203.0.113.7");
        headers.insert(CLIENT_ADDR_HEADER, "2001:db8:1:2:aaaa::1".parse().unwrap());
        let a = client_address(&headers, peer);
        headers.insert(CLIENT_ADDR_HEADER, "2001:db8:1:2:bbbb::9".parse().unwrap());
        assert_eq!(client_address(&headers, peer), a);
        assert_eq!(a, "2001:db8:1:2::/64");
        headers.insert(CLIENT_ADDR_HEADER, "::ffff:192.0.2.1".parse().unwrap());
        assert_eq!(client_address(&headers, peer), "192.0.2.1");
        assert_eq!(client_address(&HeaderMap::new(), None), "unknown");
    }
}
