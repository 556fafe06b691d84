//! The off-site repository: base backups, WAL and logical backups copied to
//! S3, Google Cloud Storage, Azure Blob or a local directory
//! (`OMNI_REPOSITORY_URL`), and a new machine restored from it.
//!
//! Layer: above `pitr` (whose archive it ships and restores into), `pg`,
//! `supervise`, `status`, `process` and `config`; `app`, `serve` and `cli`
//! call it.
//!
//! `store.rs` is the one way to the store (open, write once, read
//! verified, list, delete); `layout.rs` names every object.

// The age encryption lives with the archive it also seals (`OMNI_ENCRYPT_LOCAL`).
pub use crate::pitr::crypt;
pub mod drill;
pub mod heartbeat;
pub mod layout;
pub mod probe;
pub mod reencrypt;
pub mod retention;
pub mod store;
pub mod gcs;
pub mod fetch;
pub mod config;
pub mod ship;
