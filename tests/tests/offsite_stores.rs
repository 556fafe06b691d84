//! The off-site repository's store code (gateway/src/repository/store.rs)
//! against each real object store of the kit (tests/src/stores.rs): write
//! once, read back verified by SHA-256, list, delete, a big file in parts,
//! and a store killed and restarted on its data.
//!
//! `Repository::open` reads the credentials from the process environment
//! (object_store's `from_env`), so the tests of this file set it under one
//! lock: they never overlap inside one test process.

use std::sync::Mutex;

use bytes::Bytes;
use omni_gateway::repository::store::{sha256_hex, Put, Repository, RepositoryError};
use omni_tests::stores::{Kind, StoreServer};
use omni_tests::TempDir;

static ENV: Mutex<()> = Mutex::new(());

/// Every variable a store of the kit may set, cleared before each test sets its own.
const STORE_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ALLOW_HTTP",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_ALLOW_HTTP",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_USE_EMULATOR",
    "AZURITE_BLOB_STORAGE_URL",
    "AZURE_ALLOW_HTTP",
];

fn open(server: &StoreServer, prefix: &str) -> Repository {
    for var in STORE_VARS {
        std::env::remove_var(var);
    }
    for (k, v) in server.env() {
        std::env::set_var(k, v);
    }
    Repository::open(&server.url(prefix)).unwrap_or_else(|e| panic!("opening {}: {e}", server.url(prefix)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Bytes that do not compress and differ per call.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn store_round_trip(kind: Kind) {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let mut server = StoreServer::start_new(kind);
    let repo = open(&server, "round-trip");
    let rt = runtime();
    rt.block_on(async {
        // Write once; the same bytes again count as written.
        let one = Bytes::from(random_bytes(100_000, 1));
        assert_eq!(repo.put_once("probe/a", one.clone()).await.unwrap(), Put::Created, "{}", server.log());
        let again = repo.put_once("probe/a", one.clone()).await.unwrap();
        let other = Bytes::from_static(b"other bytes");
        if !kind.honours_conditional_put() {
            // rclone ignores If-None-Match: the retry rewrote the same bytes.
            assert_eq!(again, Put::Created);
        } else {
            assert_eq!(again, Put::AlreadyThere, "{kind:?}");
            let conflict = repo.put_once("probe/a", other.clone()).await.unwrap_err();
            assert!(matches!(conflict, RepositoryError::Conflict { .. }), "{kind:?}: {conflict}");
            assert_eq!(repo.get("probe/a").await.unwrap(), one, "{kind:?}: an object is never overwritten");
        }

        // Read back, verified.
        assert_eq!(repo.get_verified("probe/a", &sha256_hex(&one)).await.unwrap(), one);
        let damaged = repo.get_verified("probe/a", &sha256_hex(b"something else")).await.unwrap_err();
        assert!(matches!(damaged, RepositoryError::Checksum { .. }), "{damaged}");

        // A file bigger than one request's limit goes in parts; the object is whole.
        let dir = TempDir::new("offsite-big");
        let big = random_bytes(33 * 1024 * 1024 + 12_345, 2);
        let local = dir.path().join("base.tar.lz4");
        std::fs::write(&local, &big).unwrap();
        let (put, size, sha) = repo.put_file_once("probe/big/base.tar.lz4", &local).await.unwrap_or_else(|e| panic!("{kind:?}: {e}\n{}", server.log()));
        assert_eq!((put, size, sha.as_str()), (Put::Created, big.len() as u64, sha256_hex(&big).as_str()));
        assert_eq!(repo.head("probe/big/base.tar.lz4").await.unwrap(), Some(big.len() as u64));
        assert_eq!(repo.get_verified("probe/big/base.tar.lz4", &sha).await.unwrap().len(), big.len());
        let (again, _, _) = repo.put_file_once("probe/big/base.tar.lz4", &local).await.unwrap();
        assert_eq!(again, Put::AlreadyThere);

        // List (recursive, relative to the prefix), delete.
        repo.put_once("probe/c/d", Bytes::from_static(b"x")).await.unwrap();
        let names: Vec<String> = repo.list("probe").await.unwrap().into_iter().map(|l| l.path).collect();
        assert_eq!(names, ["probe/a", "probe/big/base.tar.lz4", "probe/c/d"], "{kind:?}");
        repo.delete("probe/a").await.unwrap();
        repo.delete("probe/a").await.unwrap();
        assert_eq!(repo.head("probe/a").await.unwrap(), None);
        assert!(matches!(repo.get("probe/a").await, Err(RepositoryError::NotFound { .. })));
    });

    // Killed: writes fail with a store error (no secret in it); restarted
    // on its data: what was written is there, and writes go on.
    server.stop();
    let down = rt.block_on(repo.put_once("probe/while-down", Bytes::from_static(b"y"))).unwrap_err();
    assert!(matches!(down, RepositoryError::Store { .. }), "{kind:?}: {down}");
    for (name, value) in server.env() {
        if name.contains("SECRET") || name.ends_with("_KEY") {
            assert!(!down.to_string().contains(value.as_str()), "{name}'s value in {down}");
        }
    }
    server.start();
    rt.block_on(async {
        assert_eq!(repo.get("probe/c/d").await.unwrap(), Bytes::from_static(b"x"), "{kind:?}: data kept over a restart");
        assert_eq!(repo.put_once("probe/while-down", Bytes::from_static(b"y")).await.unwrap(), Put::Created);
    });
}

#[test]
fn s3_rclone_write_once_read_verified_list_delete_and_restart() {
    store_round_trip(Kind::Rclone);
}

#[test]
fn s3_seaweedfs_write_once_read_verified_list_delete_and_restart() {
    store_round_trip(Kind::Seaweed);
}

#[test]
fn gcs_fake_gcs_server_write_once_read_verified_list_delete_and_restart() {
    store_round_trip(Kind::FakeGcs);
}

#[test]
fn azure_azurite_write_once_read_verified_list_delete_and_restart() {
    store_round_trip(Kind::Azurite);
}
