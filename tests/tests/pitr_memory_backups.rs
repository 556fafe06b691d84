//! Memory mode run as root: the `.sql` backups work through the API although
//! `OMNI_BACKUP_DIR` did not exist before the start (the start makes it for
//! the worker's account, as in persistent mode).

use crate::gateway;

use std::os::unix::fs::MetadataExt;

use gateway::{workdir, GatewayBuilder};
use omni_tests::{Request, TEST_API_KEY};

#[test]
fn pitr_memory_mode_as_root_backs_up_into_a_backup_dir_that_did_not_exist() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: this test is about a gateway run as root");
        return;
    }
    let dir = workdir();
    let backups = dir.path().join("not/there/yet/backups");
    let gw = GatewayBuilder::new(dir.path())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("PGSERVE_MEMORY_MODE", "true")
        .env("OMNI_BACKUP_DIR", backups.display().to_string())
        .start();
    let meta = std::fs::metadata(&backups).unwrap_or_else(|e| panic!("{} was not made at start: {e}\n{}", backups.display(), gw.log()));
    assert_ne!(meta.uid(), 0, "the backup directory belongs to the worker's account");

    let created = Request::new("POST", "/api/v1/backup/create").api_key().send_to(gw.port);
    assert!(created.status == 200 || created.status == 201, "{} {}\n{}", created.status, created.text(), gw.log());
    let name = created.json()["backup_file"].as_str().expect("the backup's name").to_string();
    let listed = Request::new("GET", "/api/v1/backup/list").api_key().send_to(gw.port);
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert!(listed.text().contains(&name), "{}", listed.text());
    assert!(backups.join(&name).is_file(), "{name} is in {}", backups.display());
}
