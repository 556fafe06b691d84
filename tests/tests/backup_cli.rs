//! `omni-gateway backup …`: the operator CLI runs the same backup code as the
//! API against the gateway's embedded cluster, and says clearly when the
//! gateway is not running.

use crate::gateway;

use gateway::{cli, workdir, GatewayBuilder};
use omni_tests::{Request, TEST_API_KEY};
use serde_json::json;

#[test]
fn cli_creates_lists_and_restores_with_the_api_code_path() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let session = uuid::Uuid::new_v4().to_string();
    let set = |value: &str| {
        let r = Request::new("POST", "/api/v1/preferences").port(gw.port).session(&session).json(&json!({"key": "theme", "value": value})).send();
        assert_eq!(r.status, 200);
    };
    set("dark");

    let (ok, out, err) = cli(dir.path(), &["backup", "list"]);
    assert!(ok && out.contains("no backups"), "{out}{err}");
    let (ok, out, err) = cli(dir.path(), &["backup", "create"]);
    assert!(ok, "{out}{err}");
    let name = out.split_whitespace().next().unwrap().to_owned();
    assert!(dir.path().join("data/backups").join(&name).is_file());
    let (_, listed, _) = cli(dir.path(), &["backup", "list"]);
    assert!(listed.starts_with(&name), "{listed}");
    // The API sees the CLI's backup.
    let api = Request::get("/api/v1/backup/list").port(gw.port).api_key().send().json();
    assert_eq!(api["backups"][0]["filename"], name.as_str());

    set("light");
    let (ok, out, err) = cli(dir.path(), &["backup", "restore", &name]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("safety backup") || out.contains("saved as"), "{out}");
    let r = Request::get("/api/v1/preferences/theme").port(gw.port).session(&session).send();
    assert_eq!(r.json()["value"], "dark", "restored while the gateway serves");

    let (ok, _, err) = cli(dir.path(), &["backup", "restore", "../../etc/passwd"]);
    assert!(!ok && err.contains("omni_backup_YYYYMMDD_HHMMSS.sql"), "{err}");

    gw.terminate();
    let (ok, out, err) = cli(dir.path(), &["backup", "create"]);
    assert!(!ok, "{out}");
    assert!(err.contains("the gateway is not running") && err.contains("start it first"), "{err}");
}
