//! Preference reads and overwrites from concurrent requests, done together:
//! one statement for all that wait, and for overwrites one commit.
//!
//! With `synchronous_commit` on, each commit waits for PostgreSQL's WAL flush
//! (and wakes the WAL streamer). One `UPDATE` per request made every
//! overwrite a transaction of its own: under load most of PostgreSQL's time
//! went to commits and waiting on the WAL write lock, not to the rows. A read
//! costs less, but each was still a round trip of its own, a protocol
//! exchange and an executor start in PostgreSQL and a wakeup on both sides.
//! Here one task per kind takes every request waiting when it is free and
//! runs them as one `… FROM unnest(…)`; each request is answered after that
//! statement (for an overwrite, after its commit), so an acknowledged write is
//! as durable as before and a read sees every write acknowledged before it
//! was asked.
//!
//! This is only a faster way to do what `preferences` does anyway: anything a
//! batch does not answer (a new key, a longer anonymous value, a row another
//! transaction holds, any error) is answered `None` and the request takes the
//! usual path, whose checks, locks and errors are unchanged. An overwrite
//! batch never waits for a row lock (`SKIP LOCKED`), so a slow writer
//! elsewhere cannot stall it and two workers on one database cannot deadlock
//! through it, and it holds each key once (a second write of a key waits for
//! the next batch, keeping the order of writes).
//!
//! A request waits at most [`PATIENCE`] to be taken into a batch. While the
//! database is away a batch can take seconds to find that out (a dial
//! through a proxy that holds it while retrying a dead node); the requests
//! behind it then withdraw and go the usual path, which refuses them with a
//! 503 at once during the pool's pause between dials, instead of queueing
//! behind one hung batch after another. A request is withdrawn only if no
//! batch took it, so a write is never both batched and done alone.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

use crate::db::Db;
use crate::preferences::Owner;

/// Most requests one statement carries; a bigger backlog goes in the next.
const MAX_BATCH: usize = 256;

/// How long a request waits to be taken into a batch before it goes the
/// usual path. A batch answers in milliseconds while the database does;
/// this is for a batch stuck on one that does not.
const PATIENCE: Duration = Duration::from_millis(300);

/// A request's place: waiting in line, taken into a batch, or withdrawn by
/// its caller (who went the usual path). Each moves from `WAITING` once.
const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

/// Anonymous owners: the new value may be no longer than the one it replaces
/// (the byte limit counts anonymous storage; see `preferences`).
const OVERWRITE_SESSIONS: &str = "WITH target AS (
        SELECT p.id, v.value, v.ord
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[]) AS v(owner, key, value, ord)
        JOIN omni_user_preferences p ON p.session_id = v.owner AND p.key = v.key
        WHERE octet_length(p.value) >= octet_length(v.value)
        FOR UPDATE OF p SKIP LOCKED)
    UPDATE omni_user_preferences p SET value = target.value, updated_at = now()
    FROM target WHERE p.id = target.id
    RETURNING target.ord, target.value";

/// Accounts: only the number of keys is limited, so any overwrite fits.
const OVERWRITE_ACCOUNTS: &str = "WITH target AS (
        SELECT p.id, v.value, v.ord
        FROM unnest($1::int8[], $2::text[], $3::text[], $4::int4[]) AS v(owner, key, value, ord)
        JOIN omni_user_preferences p ON p.account_id = v.owner AND p.key = v.key
        FOR UPDATE OF p SKIP LOCKED)
    UPDATE omni_user_preferences p SET value = target.value, updated_at = now()
    FROM target WHERE p.id = target.id
    RETURNING target.ord, target.value";

const READ_SESSIONS: &str = "SELECT v.ord, p.value
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[]) AS v(owner, key, unused, ord)
    JOIN omni_user_preferences p ON p.session_id = v.owner AND p.key = v.key";

const READ_ACCOUNTS: &str = "SELECT v.ord, p.value
    FROM unnest($1::int8[], $2::text[], $3::text[], $4::int4[]) AS v(owner, key, unused, ord)
    JOIN omni_user_preferences p ON p.account_id = v.owner AND p.key = v.key";

/// What a batch answers a request: `Ok(Some(value))` found (read) or stored
/// (overwrite); `Ok(None)` not found or not stored; `Err(())` the batch
/// failed. Anything but a value found or stored goes the usual path.
type Answer = Result<Option<String>, ()>;

/// A request waiting for its batch: whose key, and for an overwrite the new value.
struct Request {
    owner: Owner,
    key: String,
    value: String,
    answer: oneshot::Sender<Answer>,
    place: Arc<AtomicU8>,
}

impl Request {
    /// Takes it into a batch, unless its caller has withdrawn it.
    fn take(&self) -> bool {
        self.place.compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    fn withdrawn(&self) -> bool {
        self.place.load(Ordering::Acquire) == WITHDRAWN
    }
}

/// One kind of batched request: its statements, and whether a batch may
/// hold a key more than once.
#[derive(Clone, Copy)]
struct Kind {
    sessions: &'static str,
    accounts: &'static str,
    one_per_key: bool,
    what: &'static str,
}

const OVERWRITE: Kind = Kind { sessions: OVERWRITE_SESSIONS, accounts: OVERWRITE_ACCOUNTS, one_per_key: true, what: "overwrites" };
/// A read of a key missing from the batch's answer is a key that does not
/// exist (the same 404 the usual path gives, read at the same moment).
const READ: Kind = Kind { sessions: READ_SESSIONS, accounts: READ_ACCOUNTS, one_per_key: false, what: "reads" };

/// The way in: cheap to clone; each kind's task is started at its first use
/// (inside the runtime, whoever builds the router).
#[derive(Clone)]
pub struct Batches {
    db: Db,
    overwrites: Arc<OnceLock<mpsc::Sender<Request>>>,
    reads: Arc<OnceLock<mpsc::Sender<Request>>>,
}

impl Batches {
    pub fn new(db: Db) -> Batches {
        Batches { db, overwrites: Arc::default(), reads: Arc::default() }
    }

    /// Writes `value` over `owner`'s existing `key`, with the other
    /// overwrites waiting at the same moment. True: stored and committed.
    /// False: not written, for the caller's usual path to decide.
    pub async fn overwrite(&self, owner: Owner, key: &str, value: &str) -> bool {
        matches!(self.ask(&self.overwrites, OVERWRITE, owner, key, value).await, Some(Ok(Some(_))))
    }

    /// `owner`'s `key`, read with the other reads waiting at the same moment:
    /// `Some(Some(value))`, `Some(None)` when there is no such key, `None`
    /// when the batch failed (the caller reads it alone).
    pub async fn read(&self, owner: Owner, key: &str) -> Option<Option<String>> {
        self.ask(&self.reads, READ, owner, key, "").await?.ok()
    }

    async fn ask(&self, queue: &OnceLock<mpsc::Sender<Request>>, kind: Kind, owner: Owner, key: &str, value: &str) -> Option<Answer> {
        let queue = queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(4 * MAX_BATCH);
            let db = self.db.clone();
            tokio::spawn(run(receiver, kind, move |statement, batch| run_batch(db.clone(), statement, kind, batch)));
            sender
        });
        ask(queue, owner, key, value).await
    }
}

/// The answer of the batch that takes this request; `None` when none took
/// it within [`PATIENCE`] (it is withdrawn, and no batch will) or the
/// batch's task is gone.
async fn ask(queue: &mpsc::Sender<Request>, owner: Owner, key: &str, value: &str) -> Option<Answer> {
    let (answer, mut asked) = oneshot::channel();
    let place = Arc::new(AtomicU8::new(WAITING));
    let request = Request { owner, key: key.to_owned(), value: value.to_owned(), answer, place: place.clone() };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // Not queued in time: not queued at all (`send` is cancel-safe).
    tokio::time::timeout_at(deadline, queue.send(request)).await.ok()?.ok()?;
    if let Ok(answer) = tokio::time::timeout_at(deadline, &mut asked).await {
        return answer.ok();
    }
    match place.compare_exchange(WAITING, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => None,
        // A batch has it: the answer comes once that statement ends.
        Err(_) => asked.await.ok(),
    }
}

async fn run<F, Fut>(mut queue: mpsc::Receiver<Request>, kind: Kind, run_batch: F)
where
    F: Fn(&'static str, Vec<Request>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut waiting: VecDeque<Request> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(request) => waiting.push_back(request),
                None => return,
            }
        }
        while waiting.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => waiting.push_back(request),
                Err(_) => break,
            }
        }
        let (sessions, accounts) = take_batch(&mut waiting, kind.one_per_key);
        tokio::join!(run_batch(kind.sessions, sessions), run_batch(kind.accounts, accounts));
    }
}

/// Takes from `waiting`, in order, at most [`MAX_BATCH`] requests (with
/// `one_per_key`, at most one of each key: a later one stays, first in line
/// for the next batch), split by the kind of owner.
fn take_batch(waiting: &mut VecDeque<Request>, one_per_key: bool) -> (Vec<Request>, Vec<Request>) {
    let mut seen = HashSet::new();
    let (mut sessions, mut accounts, mut later) = (Vec::new(), Vec::new(), VecDeque::new());
    while let Some(request) = waiting.pop_front() {
        if request.withdrawn() {
            continue;
        }
        let id = match request.owner {
            Owner::Session(id) => (0, id.as_u128()),
            Owner::Account(id) => (1, id as u128),
        };
        let entry = (id, request.key.clone());
        let repeated = one_per_key && seen.contains(&entry);
        if repeated || sessions.len() + accounts.len() == MAX_BATCH {
            later.push_back(request);
            continue;
        }
        // Withdrawn just now, its caller gone the usual path: dropped.
        if !request.take() {
            continue;
        }
        seen.insert(entry);
        if id.0 == 0 {
            sessions.push(request);
        } else {
            accounts.push(request);
        }
    }
    *waiting = later;
    (sessions, accounts)
}

async fn run_batch(db: Db, statement: &'static str, kind: Kind, batch: Vec<Request>) {
    if batch.is_empty() {
        return;
    }
    let keys: Vec<&str> = batch.iter().map(|r| r.key.as_str()).collect();
    let values: Vec<&str> = batch.iter().map(|r| r.value.as_str()).collect();
    let order: Vec<i32> = (0..batch.len() as i32).collect();
    let sessions: Vec<uuid::Uuid> = batch.iter().filter_map(|r| r.owner.session()).collect();
    let accounts: Vec<i64> = batch.iter().filter_map(|r| r.owner.account()).collect();
    let owners: &(dyn ToSql + Sync) = if sessions.is_empty() { &accounts } else { &sessions };
    let rows = async {
        let client = db.checkout().await.ok()?;
        let statement = client.prepare_cached(statement).await.ok()?;
        // An error is not answered here: every request of the batch retries
        // on its own path, which reports it (or succeeds, after a deadlock).
        client
            .query(&statement, &[owners, &keys, &values, &order])
            .await
            .map_err(|error| tracing::debug!(%error, what = kind.what, "a batch of preference requests failed; each is retried alone"))
            .ok()
    }
    .await;
    let mut answers: Vec<Answer> = vec![if rows.is_some() { Ok(None) } else { Err(()) }; batch.len()];
    for row in rows.into_iter().flatten() {
        let (ord, value): (i32, String) = (row.get(0), row.get(1));
        if let Some(slot) = answers.get_mut(ord as usize) {
            *slot = Ok(Some(value));
        }
    }
    for (request, answer) in batch.into_iter().zip(answers) {
        let _ = request.answer.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(owner: Owner, key: &str) -> Request {
        Request { owner, key: key.into(), value: "v".into(), answer: oneshot::channel().0, place: Arc::default() }
    }

    #[test]
    fn a_withdrawn_request_is_never_taken_nor_holds_its_key() {
        let session = Owner::Session(uuid::Uuid::from_u128(7));
        let mut waiting: VecDeque<Request> = [request(session, "theme"), request(session, "theme"), request(session, "lang")].into_iter().collect();
        waiting[0].place.store(WITHDRAWN, Ordering::Release);
        let (sessions, _) = take_batch(&mut waiting, true);
        assert_eq!(sessions.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["theme", "lang"], "the second write of theme goes in its place");
        assert!(sessions.iter().all(|r| r.place.load(Ordering::Acquire) == TAKEN));
        assert!(waiting.is_empty());
    }

    /// A batch that hangs (a dial to a database that is not there) keeps
    /// the requests behind it no longer than [`PATIENCE`]; they are not in
    /// the next batch, whose statement their callers' usual path replaced.
    #[tokio::test]
    async fn requests_behind_a_hung_batch_withdraw_after_their_patience_and_are_not_run_later() {
        let (sender, receiver) = mpsc::channel(4 * MAX_BATCH);
        let (release, released) = tokio::sync::watch::channel(false);
        let ran: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let seen = ran.clone();
        tokio::spawn(run(receiver, OVERWRITE, move |_, batch: Vec<Request>| {
            let (mut released, ran) = (released.clone(), seen.clone());
            async move {
                if batch.is_empty() {
                    return;
                }
                ran.lock().unwrap().extend(batch.iter().map(|r| r.key.clone()));
                released.wait_for(|go| *go).await.unwrap();
                for request in batch {
                    let _ = request.answer.send(Ok(Some(request.value)));
                }
            }
        }));
        let owner = Owner::Account(1);
        let first = tokio::spawn({
            let sender = sender.clone();
            async move { ask(&sender, owner, "first", "v").await }
        });
        while ran.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let asked = std::time::Instant::now();
        let second = tokio::time::timeout(Duration::from_secs(10), ask(&sender, owner, "second", "v")).await;
        assert_eq!(second.expect("a request behind a hung batch does not wait for it"), None, "withdrawn: the caller goes the usual path");
        assert!(asked.elapsed() >= PATIENCE, "not withdrawn before its patience: {:?}", asked.elapsed());
        release.send(true).unwrap();
        assert_eq!(first.await.unwrap(), Some(Ok(Some("v".into()))), "a taken request waits for its batch");
        assert_eq!(ask(&sender, owner, "third", "v").await, Some(Ok(Some("v".into()))));
        assert_eq!(*ran.lock().unwrap(), ["first", "third"], "the withdrawn request was in no batch");
    }

    #[test]
    fn an_overwrite_batch_holds_each_key_of_each_owner_once_and_keeps_the_order_of_the_rest() {
        let session = Owner::Session(uuid::Uuid::from_u128(7));
        let mut waiting: VecDeque<Request> = [
            request(session, "theme"),
            request(Owner::Account(7), "theme"),
            request(session, "theme"),
            request(session, "lang"),
            request(session, "theme"),
        ]
        .into_iter()
        .collect();
        let (sessions, accounts) = take_batch(&mut waiting, true);
        assert_eq!(sessions.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["theme", "lang"]);
        assert_eq!(accounts.len(), 1, "an account's key is another owner's");
        assert_eq!(waiting.len(), 2, "the two later writes of the session's theme wait");
        let (sessions, accounts) = take_batch(&mut waiting, true);
        assert_eq!((sessions.len(), accounts.len(), waiting.len()), (1, 0, 1), "one per batch, in order");
    }

    #[test]
    fn a_read_batch_may_read_a_key_twice() {
        let session = Owner::Session(uuid::Uuid::from_u128(7));
        let mut waiting: VecDeque<Request> = (0..3).map(|_| request(session, "theme")).collect();
        let (sessions, _) = take_batch(&mut waiting, false);
        assert_eq!((sessions.len(), waiting.len()), (3, 0));
    }

    #[test]
    fn a_batch_is_bounded() {
        let mut waiting: VecDeque<Request> = (0..MAX_BATCH + 10).map(|i| request(Owner::Account(i as i64), "k")).collect();
        let (_, accounts) = take_batch(&mut waiting, true);
        assert_eq!((accounts.len(), waiting.len()), (MAX_BATCH, 10));
    }
}
