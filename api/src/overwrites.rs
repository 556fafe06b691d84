//! Group commit for preference overwrites: concurrent requests that replace
//! an existing key are written by one statement and share one commit.
//!
//! With `synchronous_commit` on, each commit waits for PostgreSQL's WAL flush
//! (and wakes the WAL streamer). One `UPDATE` per request made every
//! overwrite a transaction of its own: under load most of PostgreSQL's time
//! went to commits and waiting on the WAL write lock, not to the rows. Here
//! one task takes every overwrite waiting when it is free and writes them as
//! one `UPDATE … FROM unnest(…)`, committed once; each request is answered
//! after that commit, so an acknowledged write is as durable as before.
//!
//! This is only a faster way to do what [`crate::preferences::upsert`] does
//! anyway: anything the batch does not store (a new key, a longer anonymous
//! value, a row another transaction holds, any error) is answered "not
//! written" and the request takes the usual path, whose checks, locks and
//! errors are unchanged. The batch never waits for a row lock (`SKIP
//! LOCKED`), so a slow writer elsewhere cannot stall it and two workers on one
//! database cannot deadlock through it; it holds each key once (a second
//! write of a key waits for the next batch, keeping the order of writes).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use crate::db::Db;
use crate::preferences::Owner;

/// Most overwrites one statement carries; a bigger backlog goes in the next.
const MAX_BATCH: usize = 256;

/// Anonymous owners: the new value may be no longer than the one it replaces
/// (the byte limit counts anonymous storage; see `preferences`).
const SESSIONS: &str = "WITH target AS (
        SELECT p.id, v.value, v.ord
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[]) AS v(owner, key, value, ord)
        JOIN omni_user_preferences p ON p.session_id = v.owner AND p.key = v.key
        WHERE octet_length(p.value) >= octet_length(v.value)
        FOR UPDATE OF p SKIP LOCKED)
    UPDATE omni_user_preferences p SET value = target.value, updated_at = now()
    FROM target WHERE p.id = target.id
    RETURNING target.ord";

/// Accounts: only the number of keys is limited, so any overwrite fits.
const ACCOUNTS: &str = "WITH target AS (
        SELECT p.id, v.value, v.ord
        FROM unnest($1::int8[], $2::text[], $3::text[], $4::int4[]) AS v(owner, key, value, ord)
        JOIN omni_user_preferences p ON p.account_id = v.owner AND p.key = v.key
        FOR UPDATE OF p SKIP LOCKED)
    UPDATE omni_user_preferences p SET value = target.value, updated_at = now()
    FROM target WHERE p.id = target.id
    RETURNING target.ord";

struct Overwrite {
    owner: Owner,
    key: String,
    value: String,
    /// True once the batch holding it has committed it.
    written: oneshot::Sender<bool>,
}

/// The way in: cheap to clone, the writing task started at the first use
/// (inside the runtime, whoever builds the router).
#[derive(Clone)]
pub struct Overwrites {
    db: Db,
    queue: Arc<OnceLock<mpsc::Sender<Overwrite>>>,
}

impl Overwrites {
    pub fn new(db: Db) -> Overwrites {
        Overwrites { db, queue: Arc::new(OnceLock::new()) }
    }

    /// Writes `value` over `owner`'s existing `key`, with other overwrites
    /// waiting at the same moment. True: stored and committed. False: not
    /// written, for the caller's usual path to decide.
    pub async fn write(&self, owner: Owner, key: &str, value: &str) -> bool {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(4 * MAX_BATCH);
            tokio::spawn(run(self.db.clone(), receiver));
            sender
        });
        let (written, answer) = oneshot::channel();
        let overwrite = Overwrite { owner, key: key.to_owned(), value: value.to_owned(), written };
        if queue.send(overwrite).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

async fn run(db: Db, mut queue: mpsc::Receiver<Overwrite>) {
    let mut waiting: VecDeque<Overwrite> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(overwrite) => waiting.push_back(overwrite),
                None => return,
            }
        }
        while waiting.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(overwrite) => waiting.push_back(overwrite),
                Err(_) => break,
            }
        }
        let (sessions, accounts) = take_batch(&mut waiting);
        tokio::join!(write_batch(&db, SESSIONS, sessions), write_batch(&db, ACCOUNTS, accounts));
    }
}

/// Takes from `waiting`, in order, at most one overwrite of each key (a
/// later write of the same key stays, first in line for the next batch),
/// split by the kind of owner.
fn take_batch(waiting: &mut VecDeque<Overwrite>) -> (Vec<Overwrite>, Vec<Overwrite>) {
    let mut seen = HashSet::new();
    let (mut sessions, mut accounts, mut later) = (Vec::new(), Vec::new(), VecDeque::new());
    while let Some(overwrite) = waiting.pop_front() {
        let id = match overwrite.owner {
            Owner::Session(id) => (0, id.as_u128()),
            Owner::Account(id) => (1, id as u128),
        };
        if !seen.insert((id, overwrite.key.clone())) || sessions.len() + accounts.len() == MAX_BATCH {
            later.push_back(overwrite);
        } else if id.0 == 0 {
            sessions.push(overwrite);
        } else {
            accounts.push(overwrite);
        }
    }
    *waiting = later;
    (sessions, accounts)
}

async fn write_batch(db: &Db, statement: &str, batch: Vec<Overwrite>) {
    if batch.is_empty() {
        return;
    }
    let keys: Vec<&str> = batch.iter().map(|o| o.key.as_str()).collect();
    let values: Vec<&str> = batch.iter().map(|o| o.value.as_str()).collect();
    let order: Vec<i32> = (0..batch.len() as i32).collect();
    let written: Option<Vec<i32>> = async {
        let client = db.client().await.ok()?;
        let statement = client.prepare_cached(statement).await.ok()?;
        let rows = match batch[0].owner {
            Owner::Session(_) => {
                let owners: Vec<uuid::Uuid> = batch.iter().filter_map(|o| o.owner.session()).collect();
                client.query(&statement, &[&owners, &keys, &values, &order]).await
            }
            Owner::Account(_) => {
                let owners: Vec<i64> = batch.iter().filter_map(|o| o.owner.account()).collect();
                client.query(&statement, &[&owners, &keys, &values, &order]).await
            }
        };
        // An error is not answered here: every request of the batch retries
        // on its own path, which reports it (or succeeds, after a deadlock).
        rows.map_err(|error| tracing::debug!(%error, "a batch of preference overwrites failed; each is retried alone"))
            .ok()
            .map(|rows| rows.iter().map(|row| row.get(0)).collect())
    }
    .await;
    let mut stored = vec![false; batch.len()];
    for ord in written.into_iter().flatten() {
        if let Some(slot) = stored.get_mut(ord as usize) {
            *slot = true;
        }
    }
    for (overwrite, stored) in batch.into_iter().zip(stored) {
        let _ = overwrite.written.send(stored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overwrite(owner: Owner, key: &str) -> (Overwrite, oneshot::Receiver<bool>) {
        let (written, answer) = oneshot::channel();
        (Overwrite { owner, key: key.into(), value: "v".into(), written }, answer)
    }

    #[test]
    fn a_batch_holds_each_key_of_each_owner_once_and_keeps_the_order_of_the_rest() {
        let session = Owner::Session(uuid::Uuid::from_u128(7));
        let mut waiting: VecDeque<Overwrite> = [
            overwrite(session, "theme"),
            overwrite(Owner::Account(7), "theme"),
            overwrite(session, "theme"),
            overwrite(session, "lang"),
            overwrite(session, "theme"),
        ]
        .into_iter()
        .map(|(o, _)| o)
        .collect();
        let (sessions, accounts) = take_batch(&mut waiting);
        assert_eq!(sessions.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["theme", "lang"]);
        assert_eq!(accounts.len(), 1, "an account's key is another owner's");
        assert_eq!(waiting.len(), 2, "the two later writes of the session's theme wait");
        let (sessions, accounts) = take_batch(&mut waiting);
        assert_eq!((sessions.len(), accounts.len(), waiting.len()), (1, 0, 1), "one per batch, in order");
    }

    #[test]
    fn a_batch_is_bounded() {
        let mut waiting: VecDeque<Overwrite> =
            (0..MAX_BATCH + 10).map(|i| overwrite(Owner::Account(i as i64), "k").0).collect();
        let (_, accounts) = take_batch(&mut waiting);
        assert_eq!((accounts.len(), waiting.len()), (MAX_BATCH, 10));
    }
}
