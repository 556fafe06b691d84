//! Verified logical backups: the sha256 recorded when a `.sql` backup is made
//! is checked before it is downloaded or restored, and a file that changed
//! since is refused with a clear error (API and CLI alike).

use crate::gateway;

use gateway::{cli, workdir, GatewayBuilder};
use omni_tests::{Request, TEST_API_KEY};

#[test]
fn pitr_a_flipped_byte_in_a_sql_backup_refuses_its_restore_and_download() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let created = Request::new("POST", "/api/v1/backup/create").port(gw.port).api_key().send();
    assert_eq!(created.status, 200, "{}", created.text());
    let name = created.json()["backup_file"].as_str().unwrap().to_owned();
    let path = dir.path().join("data/backups").join(&name);
    let recorded = std::fs::read_to_string(path.with_file_name(format!("{name}.sha256"))).expect("a sha256 is recorded beside the backup");
    assert_eq!(recorded.split_whitespace().nth(1), Some(name.as_str()), "sha256sum format: {recorded}");

    // Intact, it downloads.
    let ok = Request::get(&format!("/api/v1/backup/download/{name}")).port(gw.port).api_key().send();
    assert_eq!(ok.status, 200);

    // One byte in the middle flipped: same size, still a "complete" dump.
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let download = Request::get(&format!("/api/v1/backup/download/{name}")).port(gw.port).api_key().send();
    assert_eq!(download.status, 422, "{}", download.text());
    assert_eq!(download.json()["code"], "backup_changed");
    assert!(download.json()["detail"].as_str().unwrap().contains("sha256"), "{}", download.text());

    let restore = Request::new("POST", format!("/api/v1/backup/restore/{name}")).port(gw.port).api_key().send();
    assert_eq!(restore.status, 422, "{}", restore.text());
    assert_eq!(restore.json()["code"], "backup_changed");

    let (ok, out, err) = cli(dir.path(), &["backup", "restore", &name]);
    assert!(!ok, "{out}");
    assert!(err.contains("changed since it was made"), "{err}");
    // Nothing else was made or lost: the refused restore took no safety backup.
    let list = Request::get("/api/v1/backup/list").port(gw.port).api_key().send().json();
    assert_eq!(list["backups"].as_array().unwrap().len(), 1, "{list}");
}
