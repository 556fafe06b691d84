//! README.md's "Restore by hand from the bucket", run as written: a gateway
//! ships an encrypted repository (age, to a key made by Debian's
//! `age-keygen`) into a directory (`file://`, the bucket already "copied
//! down"); rows are written before a base backup, after it into a segment
//! shipped whole, and after that into the newest segment, which is in the
//! repository only as chunks. The server is then lost (kill -9), and the
//! README's `sh` blocks are taken from README.md itself and run by bash
//! with Debian's `age`, `lz4`, `tar` and PostgreSQL's `pg_ctl`/`psql` run as
//! `postgres`; only the paths (`/srv/…`, the key), the generation, the backup
//! id, the dump's name and the binaries' major are substituted, and
//! `pg_ctl` gets the test's port and socket directory. The restored cluster
//! must promote itself and hold every row; the logical backup must check
//! against its `.sha256` and load into a scratch database; the block run
//! again with its point-in-time line uncommented must stop at that time
//! and promote. Then the key is rotated (`backup reencrypt --identity OLD`
//! to a new key made the same way), first with `OMNI_REPOSITORY_DELETE=false`
//! (each old object beside its `.k-<tag>` copy: the new key opens only the
//! copy), then with deletion (the copies alone): each time both blocks, run
//! with the new key only and the backup's copy `<id>.k-<tag>`, must bring
//! back every row and the dump.

use crate::gateway;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gateway::{cli_env, keygen, kill9_with_its_postgres, take_base_backup, wait_archived, wait_for_base_backup, wait_for_repository as wait_for, wait_postgres_gone, workdir, GatewayBuilder};
use omni_tests::{free_port, pg_bin_dir, wait_until, Request, TempDir, TEST_API_KEY};

/// The `sh` blocks of README.md's "Restore by hand from the bucket", in order.
fn readme_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = &readme[readme.find("**Restore by hand from the bucket**").expect("the README has its by-hand restore")..];
    let section = &section[..section.find("**Server-side encryption**").expect("the section after it")];
    section.split("```sh\n").skip(1).map(|b| b[..b.find("```").unwrap()].to_owned()).collect()
}

/// `text` with each `(from, to)` replaced; every `from` must be there (the
/// README changed otherwise, and this test with it).
fn substitute(text: &str, pairs: &[(&str, String)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in pairs {
        assert!(out.contains(from), "the README's block no longer has {from:?}:\n{text}");
        out = out.replace(from, to);
    }
    out
}

/// Runs `script` with bash (errexit, nounset, pipefail, traced) in `cwd`;
/// it must succeed. Returns its stdout.
fn bash(script: &str, cwd: &Path, env: &[(&str, String)]) -> String {
    let out = Command::new("bash").args(["-euxo", "pipefail", "-c", script]).current_dir(cwd).envs(env.iter().map(|(k, v)| (*k, v.as_str()))).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the README's commands failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
    stdout.into_owned()
}


/// How far the chunks in `dir` (`<from>-<to>`, 8 hex digits each) cover
/// their segment contiguously from byte 0.
fn chunked_up_to(dir: &Path) -> u64 {
    let mut chunks: Vec<(u64, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (from, to) = name.split_once('-')?;
            Some((u64::from_str_radix(from, 16).ok()?, u64::from_str_radix(to, 16).ok()?))
        })
        .collect();
    chunks.sort();
    chunks.into_iter().fold(0, |end, (from, to)| if from == end { to } else { end })
}

/// The cluster the README's commands started, stopped (immediate) however the test ends.
struct Started(PathBuf);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = Command::new("runuser").args(["-u", "postgres", "--"]).arg(pg_bin_dir().join("pg_ctl")).arg("-D").arg(&self.0).args(["stop", "-m", "immediate"]).output();
    }
}

/// What a run of the README's first block needs: where the bucket was
/// copied down, the key, the generation and the backup id.
struct Bucket<'a> {
    dir: &'a Path,
    key: &'a Path,
    gen: &'a str,
    id: &'a str,
}

/// The README's first block with its `/srv/…` under `root` (the bucket's
/// copy at `bucket.dir`), then `extra` substituted; started on a free port
/// with its socket in the data directory. Returns the port, the started
/// cluster and what the commands printed.
fn restore_by_hand(block: &str, root: &Path, bucket: &Bucket, extra: &[(&str, String)]) -> (u16, Started, String) {
    std::fs::create_dir_all(root).unwrap();
    let port = free_port();
    let data = root.join("pg");
    let mut pairs = vec![
        ("/srv/bucket", bucket.dir.display().to_string()),
        ("/srv/", format!("{}/", root.display())),
        ("/root/key.txt", bucket.key.display().to_string()),
        ("/usr/lib/postgresql/17/bin", pg_bin_dir().display().to_string()),
        ("<sysid>-pg17", bucket.gen.to_owned()),
        ("<id>", bucket.id.to_owned()),
        // The test machine's port, and a socket directory of the cluster's own.
        ("pg_ctl -D", format!("pg_ctl -o '-p {port} -k {}' -D", data.display())),
    ];
    pairs.extend(extra.iter().cloned());
    let script = substitute(block, &pairs);
    let started = Started(data.clone());
    let out = bash(&script, root, &[("PGPORT", port.to_string()), ("PGHOST", data.display().to_string())]);
    (port, started, out)
}

/// A connection to `db` of the restored cluster on `port` once it is out
/// of recovery (promoted).
fn promoted(port: u16, password: &str, db: &str) -> postgres::Client {
    wait_until(Duration::from_secs(180), "the restored cluster to leave recovery", || {
        let mut client = postgres::Client::connect(&format!("postgres://postgres:{password}@127.0.0.1:{port}/{db}"), postgres::NoTls).ok()?;
        let recovering: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).ok()?.get(0);
        (!recovering).then_some(client)
    })
}

/// Rows of `by_hand` per phase, in the order written.
fn phases(client: &mut postgres::Client) -> Vec<(String, i64)> {
    client.query("SELECT phase, count(*) FROM by_hand GROUP BY phase ORDER BY min(id)", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[test]
fn offsite_by_hand_the_readme_restore_from_an_encrypted_bucket_brings_back_every_row_a_point_in_time_and_the_logical_dump() {
    let tmp = TempDir::new("byhand");
    let (key, public) = keygen(tmp.path(), "key.txt");
    let bucket = tmp.path().join("bucket");
    let source = workdir();
    let mut gw = GatewayBuilder::new(source.path())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_REPOSITORY_URL", format!("file://{}", bucket.display()))
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        .env("OMNI_ENCRYPT_RECIPIENTS", public)
        .start();
    wait_for_base_backup(&gw);
    let identity: serde_json::Value = serde_json::from_slice(&std::fs::read(source.path().join("data/wal/identity.json")).unwrap()).unwrap();
    let major = identity["major"].as_u64().unwrap();
    let gen = format!("{}-pg{major}", identity["system_identifier"].as_str().unwrap());
    let wal = bucket.join(&gen).join("wal");

    // Rows before the base backup the restore starts from.
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE by_hand (id int PRIMARY KEY, phase text NOT NULL); INSERT INTO by_hand SELECT g, 'before' FROM generate_series(1, 100) g").unwrap();
    let id = take_base_backup(&gw);
    let manifest = bucket.join(&gen).join("base").join(&id).join("manifest.json");
    wait_for(&gw, Duration::from_secs(180), &format!("{} in the repository", manifest.display()), || manifest.is_file().then_some(()));

    // After it: rows in a segment completed and shipped whole.
    db.batch_execute("INSERT INTO by_hand SELECT g, 'whole' FROM generate_series(101, 200) g").unwrap();
    let whole: String = db.query_one("SELECT file_name FROM pg_walfile_name_offset(pg_switch_wal())", &[]).unwrap().get(0);
    wait_for(&gw, Duration::from_secs(60), &format!("{whole}.lz4 in the repository"), || wal.join(format!("{whole}.lz4")).is_file().then_some(()));

    // A logical backup (of rows 1..=200), shipped with its .sha256.
    let created = Request::new("POST", "/api/v1/backup/create").api_key().port(gw.port).send();
    assert_eq!(created.status, 200, "{}", created.text());
    let name = created.json()["backup_file"].as_str().unwrap_or_else(|| panic!("no backup_file in {}", created.text())).to_owned();
    let sidecar = bucket.join("logical").join(format!("{name}.sha256"));
    wait_for(&gw, Duration::from_secs(60), "the logical backup's .sha256 in the repository", || sidecar.is_file().then_some(()));

    // T, on the server's clock; then rows that only the chunks of the newest segment hold.
    let t: String = db.query_one("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00')", &[]).unwrap().get(0);
    db.batch_execute("INSERT INTO by_hand SELECT g, 'chunks' FROM generate_series(201, 300) g").unwrap();
    let (newest, offset): (String, i32) = db.query_one("SELECT file_name, file_offset FROM pg_walfile_name_offset(pg_current_wal_lsn())", &[]).map(|r| (r.get(0), r.get(1))).unwrap();
    assert!(newest > whole, "the last rows are in a later segment than {whole}: {newest}");
    wait_archived(&mut db);
    let chunks = wal.join(format!("{newest}.chunks"));
    wait_for(&gw, Duration::from_secs(60), &format!("the chunks of {newest} up to byte {offset}"), || (chunked_up_to(&chunks) >= offset as u64).then_some(()));
    drop(db);

    // The server is lost; the repository is all there is.
    let password = std::fs::read_to_string(source.path().join("data/postgres.password")).unwrap().trim().to_owned();
    kill9_with_its_postgres(&mut gw);
    wait_postgres_gone(&gw.data_dir());
    assert!(!wal.join(format!("{newest}.lz4")).exists(), "{newest} is in the repository only as chunks");

    // The README's first block, as written.
    let blocks = readme_blocks();
    assert_eq!(blocks.len(), 2, "the README's by-hand restore is two sh blocks: {blocks:?}");
    let copy = Bucket { dir: &bucket, key: &key, gen: &gen, id: &id };
    let clock = Instant::now();
    let (port, started, out) = restore_by_hand(&blocks[0], &tmp.path().join("latest"), &copy, &[]);
    let ran = clock.elapsed();
    let said = out.lines().last().unwrap_or_default().trim().to_owned();
    assert!(said == "t" || said == "f", "the last command prints t or f (pg_is_in_recovery()): {out}");

    // Promoted by itself at the end of the WAL, with every row.
    let mut restored = promoted(port, &password, "omni");
    eprintln!("by hand: the README's commands ran in {} ms, promoted {} ms after they began (psql said {said})", ran.as_millis(), clock.elapsed().as_millis());
    let log = std::fs::read_to_string(started.0.join("restore.log")).unwrap_or_default();
    assert!(log.contains("archive recovery complete"), "{log}");
    assert!(log.contains(&format!("restored log file \"{newest}\" from archive")), "the chunks of {newest} were replayed: {log}");
    assert_eq!(phases(&mut restored), [("before".to_owned(), 100), ("whole".to_owned(), 100), ("chunks".to_owned(), 100)], "every row written before the last WAL was shipped");
    let timeline: i32 = restored.query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[]).unwrap().get(0);
    assert!(timeline >= 2, "promoted onto a new timeline: {timeline}");

    // The second block: the logical backup, checked and loaded.
    let mut scratch = load_dump(&blocks, &copy, &tmp.path().join("latest"), &name, port, &started, &password);
    let rows: i64 = scratch.query_one("SELECT count(*) FROM by_hand", &[]).unwrap().get(0);
    assert_eq!(rows, 200, "the logical backup holds the rows written before it");
    drop((restored, scratch, started));

    // The point-in-time line, uncommented: the rows up to T, promoted.
    let (port, started, _) = restore_by_hand(&blocks[0], &tmp.path().join("pitr"), &copy, &[("# a point in time: ", String::new()), ("2026-12-05 10:00:00+00", t.clone())]);
    let mut restored = promoted(port, &password, "omni");
    let log = std::fs::read_to_string(started.0.join("restore.log")).unwrap_or_default();
    assert!(log.contains("recovery stopping before commit"), "{log}");
    assert_eq!(phases(&mut restored), [("before".to_owned(), 100), ("whole".to_owned(), 100)], "the rows committed before {t}, none after");
    drop((restored, started));

    // A key rotation (README, "Rotating the key") to a new key: every object
    // gets a copy named with the new keys' tag. Kept beside the old objects
    // first, then alone; both times the README's blocks, with the new key
    // only, bring everything back.
    let (new_key, new_public) = keygen(tmp.path(), "new-key.txt");
    let url = format!("file://{}", bucket.display());
    let originals = [format!("base/{id}/manifest.json"), format!("wal/{whole}.lz4"), format!("logical/{name}")];
    for delete in [false, true] {
        let env = [("OMNI_REPOSITORY_URL", url.clone()), ("OMNI_ENCRYPT_RECIPIENTS", new_public.clone()), ("OMNI_REPOSITORY_DELETE", delete.to_string())];
        let (ok, out, err) = cli_env(source.path(), &["backup", "reencrypt", "--identity", &key.display().to_string()], &env);
        assert!(ok, "backup reencrypt (OMNI_REPOSITORY_DELETE={delete}):\n{out}\n{err}");
        let tag = out.split("keys tag k-").nth(1).map(|t| t[..8].to_owned()).unwrap_or_else(|| panic!("the keys tag is said: {out}"));
        let in_bucket = |name: &str| if name.starts_with("logical/") { bucket.join(name) } else { bucket.join(&gen).join(name) };
        for original in &originals {
            assert_eq!(in_bucket(original).exists(), !delete, "{original} with OMNI_REPOSITORY_DELETE={delete}");
        }
        let copies = [format!("base/{id}.k-{tag}/manifest.json"), format!("wal/{whole}.lz4.k-{tag}"), format!("logical/{name}.k-{tag}"), format!("logical/{name}.sha256.k-{tag}")];
        for copy in &copies {
            assert!(in_bucket(copy).is_file(), "{copy} after the rotation (OMNI_REPOSITORY_DELETE={delete})");
        }
        let chunk_copies = std::fs::read_dir(&chunks).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(&format!(".k-{tag}"))).count();
        assert!(chunk_copies > 0, "the chunks of {newest} have copies");

        let rotated = Bucket { dir: &bucket, key: &new_key, gen: &gen, id: &format!("{id}.k-{tag}") };
        let root = tmp.path().join(format!("rotated-delete-{delete}"));
        let (port, started, out) = restore_by_hand(&blocks[0], &root, &rotated, &[]);
        assert!(out.contains(&format!("/base/{id}.k-{tag}/manifest.json")), "the listing names the backup's copy, which the new key opens: {out}");
        assert!(!out.contains(&format!("/base/{id}/manifest.json")), "the listing does not name the old backup, which the new key does not open: {out}");
        let mut restored = promoted(port, &password, "omni");
        let log = std::fs::read_to_string(started.0.join("restore.log")).unwrap_or_default();
        assert!(log.contains(&format!("restored log file \"{newest}\" from archive")), "the copies of the chunks of {newest} were replayed: {log}");
        assert_eq!(
            phases(&mut restored),
            [("before".to_owned(), 100), ("whole".to_owned(), 100), ("chunks".to_owned(), 100)],
            "every row, from the rotated bucket (OMNI_REPOSITORY_DELETE={delete}) with the new key alone"
        );
        let mut scratch = load_dump(&blocks, &rotated, &root, &name, port, &started, &password);
        let rows: i64 = scratch.query_one("SELECT count(*) FROM by_hand", &[]).unwrap().get(0);
        assert_eq!(rows, 200, "the rotated logical backup holds the rows written before it");
        drop((restored, scratch, started));
    }
}

/// The README's second block (the logical backup `name`, checked and
/// loaded into `scratch` of the cluster the first block started under
/// `root`), with the variables and helpers of the first block, as in the
/// same shell. Returns a connection to `scratch`.
fn load_dump(blocks: &[String], bucket: &Bucket, root: &Path, name: &str, port: u16, started: &Started, password: &str) -> postgres::Client {
    let first: Vec<&str> = blocks[0].lines().collect();
    let mut shell = Vec::new();
    for start in ["R=", "shopt ", "P=", "opens()", "pick()"] {
        shell.push(*first.iter().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("the first block has a line {start}…: {first:?}")));
    }
    let pairs = [
        ("/srv/bucket", bucket.dir.display().to_string()),
        ("/srv/", format!("{}/", root.display())),
        ("/root/key.txt", bucket.key.display().to_string()),
        ("/usr/lib/postgresql/17/bin", pg_bin_dir().display().to_string()),
        ("<name>", name.to_owned()),
    ];
    let env = [("PGPORT", port.to_string()), ("PGHOST", started.0.display().to_string())];
    let out = bash(&substitute(&format!("{}\n{}", shell.join("\n"), blocks[1]), &pairs), root, &env);
    assert!(out.contains(&format!("{name}: OK")), "sha256sum -c checks the dump: {out}");
    promoted(port, password, "scratch")
}
