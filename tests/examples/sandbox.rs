//! A throw-away PostgreSQL and an `omni-api` worker for scripts (fuzzing,
//! benchmarks): prints `port=<port>` and `api_key=<key>` on stdout once the
//! worker is healthy, then runs until its stdin closes, and cleans both up.
//!
//! Tying the lifetime to stdin means a script that dies, even by SIGKILL,
//! still ends the sandbox: its end of the pipe closes with it.
//!
//! Environment: `OMNI_API_BIN` picks the worker executable (default
//! `target/debug/omni-api`); `LOG_LEVEL` and `OMNI_API_DB_POOL_SIZE` are
//! passed to the worker.

use std::io::Read;

use omni_tests::{TempPostgres, WorkerBuilder, TEST_API_KEY};

fn main() {
    let pg = TempPostgres::start_new();
    let mut builder = WorkerBuilder::new(&pg.url()).env("LOG_LEVEL", std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".into()));
    if let Ok(size) = std::env::var("OMNI_API_DB_POOL_SIZE") {
        builder = builder.env("OMNI_API_DB_POOL_SIZE", size);
    }
    if let Some(binary) = std::env::var_os("OMNI_API_BIN") {
        builder = builder.binary(binary.into());
    }
    let worker = builder.start();
    println!("port={}", worker.port);
    println!("api_key={TEST_API_KEY}");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    if std::env::var_os("SANDBOX_PRINT_LOG").is_some() {
        eprintln!("{}", worker.log());
    }
}
