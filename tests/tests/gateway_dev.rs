//! Development mode and log output (issues 2 and 4): a rebuilt worker binary
//! is swapped in without a manual restart, UI edits are served at once, and
//! `LOG_FORMAT=json` gives one JSON object per line.

use crate::gateway;

use std::time::Duration;

use gateway::{alive, workdir, GatewayBuilder};
use omni_tests::{bin_path, wait_until, Request, TEST_API_KEY};

#[test]
fn dev_mode_swaps_in_a_rebuilt_worker_and_serves_ui_edits_without_restart() {
    let dir = workdir();
    // A private copy of the worker binary stands in for cargo's output file.
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let worker = bin_dir.join("omni-api");
    std::fs::copy(bin_path("omni-api"), &worker).unwrap();
    let ui = dir.path().join("ui");
    std::fs::create_dir_all(&ui).unwrap();
    std::fs::write(ui.join("index.html"), "<!doctype html><title>v1</title>").unwrap();
    std::fs::write(ui.join("note.txt"), "first").unwrap();

    let gw = GatewayBuilder::new(dir.path())
        .env("OMNI_DEV", "true")
        .env("OMNI_API_BIN", worker.display().to_string())
        .env("OMNI_UI_DIR", ui.display().to_string())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .start();
    assert_eq!(gw.get("/note.txt").text(), "first");
    std::fs::write(ui.join("note.txt"), "second").unwrap();
    assert_eq!(gw.get("/note.txt").text(), "second", "UI files are read from disk on every request");

    let old = gw.pid_of("api").unwrap();
    // What a rebuild does: a new file replaces the old one.
    let fresh = bin_dir.join(".omni-api.new");
    std::fs::copy(bin_path("omni-api"), &fresh).unwrap();
    std::fs::rename(&fresh, &worker).unwrap();
    let c = gw.wait_component("api", "the rebuilt worker to be swapped in", Duration::from_secs(30), |c| {
        c["state"] == "ready" && c["pid"].as_i64().is_some_and(|p| p as i32 != old)
    });
    assert_eq!(c["restarts"], 0, "a dev reload is not a crash: {c}");
    wait_until(Duration::from_secs(20), "the old worker to exit", || (!alive(old)).then_some(()));
    assert_eq!(Request::get("/api/v1/health").port(gw.port).send().status, 200);
    assert!(gw.log().contains("worker binary changed"), "{}", gw.log());
}

#[test]
fn json_logs_are_one_object_per_line_with_children_tagged() {
    let dir = workdir();
    // Debug level: initdb's progress lines are logged there (info has one summary line).
    let mut gw = GatewayBuilder::new(dir.path()).fresh_cluster().env("LOG_FORMAT", "json").env("LOG_LEVEL", "debug").env("OMNI_API_KEY", TEST_API_KEY).start();
    assert!(gw.terminate().success());
    let log = gw.log();
    let mut children = std::collections::BTreeSet::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string() && v["message"].is_string(), "{line}");
        if let Some(c) = v["child"].as_str() {
            children.insert(c.to_owned());
        }
    }
    for expected in ["initdb", "postgres", "api"] {
        assert!(children.contains(expected), "no line tagged child={expected}: {children:?}");
    }
}

#[test]
fn onboarding_storage_settings_take_effect_at_the_next_start() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let r = Request::new("POST", "/api/v1/setup/initialize")
        .port(gw.port)
        .api_key()
        .json(&serde_json::json!({
            "data_dir": "./data/postgres", "memory_mode": true,
            "replication_enabled": false, "replication_url": null, "replication_databases": null,
            "redis_enabled": false, "redis_url": null, "redis_prefix_key": null, "redis_ttl": null, "redis_save_instances": null
        }))
        .send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["restart_required"], true);
    assert!(gw.terminate().success());

    let mut again = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let mem_dir = std::path::Path::new("/dev/shm").join(format!("omni-gateway-mem-{}", again.child.pid()));
    assert!(mem_dir.join("PG_VERSION").is_file(), "the saved memory_mode must apply:\n{}", again.log());
    assert!(again.terminate().success());

    // The environment still wins over what onboarding saved.
    let third = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("PGSERVE_MEMORY_MODE", "false").start();
    let mem_dir = std::path::Path::new("/dev/shm").join(format!("omni-gateway-mem-{}", third.child.pid()));
    assert!(!mem_dir.exists());
    assert!(third.log().contains("data directory:"), "{}", third.log());
}

#[test]
fn an_old_sqlite_database_is_reported_at_start_by_the_gateway_and_the_api() {
    let dir = workdir();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/automagik-omni.db"), b"SQLite format 3\0").unwrap();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let expected = dir.path().join("data/automagik-omni.db").display().to_string();
    assert!(gw.log().contains("found an old SQLite database") && gw.log().contains(&expected), "{}", gw.log());
    let status = Request::get("/api/v1/migration/status").port(gw.port).api_key().send().json();
    assert_eq!(status["sqlite_found"], true, "{status}");
    assert_eq!(status["migration_recommended"], true, "{status}");
}
