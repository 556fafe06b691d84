//! `OMNI_ENCRYPT_LOCAL=true`: the WAL archive is sealed on this machine too,
//! to the same `OMNI_ENCRYPT_*` recipients as what is uploaded, so a stolen
//! disk or a copied `OMNI_WAL_DIR` reads no backup.
//!
//! * **Same files as the uploads.** A sealed file is named like its plain
//!   self plus `.age`, and holds what the off-site object of that name
//!   holds: `stream/<segment>.lz4.age` is `wal/<segment>.lz4` (the segment
//!   as one lz4 frame, then age: compress, then encrypt),
//!   `base/<id>/base.tar.lz4.age` is `base/<id>/base.tar.lz4`. Debian's
//!   `age -d -i key.txt` opens each; the shipper uploads them as they are
//!   (the server holds public keys only: it could not seal them again).
//! * **What stays plain:** the segment being written (`.partial`:
//!   `pg_receivewal` writes into it, sealed once it is complete), the
//!   `.history` files (timeline switch positions) and `base/<id>.json` (a
//!   backup's times and WAL positions), which retention, the window and
//!   the status read without any key.
//! * **Restores decrypt** with `OMNI_DECRYPT_IDENTITY_FILE` or `restore
//!   --identity FILE` ([`set_keys`]): base backups as they are read
//!   (`tarball.rs`), segments through `omni-gateway restore-wal`, the
//!   archive's `restore_command` ([`restore_wal_main`]). Without the key a
//!   restore stops before it touches anything, naming the keys it needs.
//!
//! Layer: inside `pitr`; the encryption itself is `crypt.rs`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::{Context, Result};

use super::archive::{self, sealed_segment};
use super::crypt::{self, CryptError, Encryption, Keys};
use crate::process::privilege::Account;

/// What a sealed file's name ends with.
pub const SUFFIX: &str = ".age";

static LOCAL: OnceLock<Encryption> = OnceLock::new();
static KEYS: RwLock<Option<Arc<Keys>>> = RwLock::new(None);

/// Turns local sealing on (`OMNI_ENCRYPT_LOCAL=true`), with the encryption
/// the uploads use; the first one set stays.
pub fn set_encryption(encryption: Encryption) {
    if encryption.is_on() {
        let _ = LOCAL.set(encryption);
    }
}

/// The encryption local copies are sealed with, when `OMNI_ENCRYPT_LOCAL` is on.
pub fn encryption() -> Option<&'static Encryption> {
    LOCAL.get()
}

/// The private keys sealed local files are opened with (a restore's identity).
pub fn set_keys(keys: Option<Keys>) {
    *KEYS.write().unwrap_or_else(|e| e.into_inner()) = keys.map(Arc::new);
}

pub fn keys() -> Option<Arc<Keys>> {
    KEYS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether `path` names a sealed file.
pub fn is_sealed_name(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(SUFFIX))
}

/// The first bytes of a file (an age header fits).
pub fn head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)?.take(64 * 1024).read_to_end(&mut head)?;
    Ok(head)
}

/// Without keys: the error naming what `path` needs, when it is sealed.
pub fn check_openable(path: &Path) -> Result<(), CryptError> {
    if !is_sealed_name(path) {
        return Ok(());
    }
    let what = path.display().to_string();
    let head = head(path).map_err(|source| CryptError::Io { what: what.clone(), source })?;
    match keys() {
        None => Err(crypt::needs_key(&head, &what)),
        Some(keys) => {
            // The header alone says whether the key opens it.
            keys.open(head.as_slice(), &what).map(drop)
        }
    }
}

/// A local file to read: decrypted when it is sealed, as it is otherwise.
pub fn open(path: &Path) -> Result<Box<dyn Read + Send>, CryptError> {
    let what = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| CryptError::Io { what: what.clone(), source })?;
    if !is_sealed_name(path) {
        return Ok(Box::new(file));
    }
    let Some(keys) = keys() else {
        let head = head(path).map_err(|source| CryptError::Io { what: what.clone(), source })?;
        return Err(crypt::needs_key(&head, &what));
    };
    Ok(Box::new(keys.open(file, &what)?))
}

/// The whole content of a local file, decrypted when it is sealed.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    open(path)?.read_to_end(&mut out).with_context(|| format!("reading {}: its encrypted data is damaged", path.display()))?;
    Ok(out)
}

/// `src` sealed into `dst` (`lz4`: one lz4 frame first, as the off-site WAL
/// objects are): written to a temporary name, flushed, given to `account`,
/// renamed, the directory flushed. `src` is left in place.
pub fn seal_file(encryption: &Encryption, src: &Path, dst: &Path, lz4: bool, account: &Account) -> Result<()> {
    let sealer = encryption.sealer()?;
    let dir = dst.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", dst.file_name().unwrap_or_default().to_string_lossy()));
    let written = (|| -> Result<()> {
        let mut input = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
        let output = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let io = |e: std::io::Error| anyhow::Error::new(e).context(format!("sealing {} into {}", src.display(), tmp.display()));
        let mut sealed = sealer.wrap(std::io::BufWriter::with_capacity(256 * 1024, output)).map_err(io)?;
        if lz4 {
            let mut info = lz4_flex::frame::FrameInfo::new();
            info.content_checksum = true;
            let mut encoder = lz4_flex::frame::FrameEncoder::with_frame_info(info, &mut sealed);
            std::io::copy(&mut input, &mut encoder).map_err(io)?;
            encoder.finish().map_err(|e| io(std::io::Error::other(e)))?;
        } else {
            std::io::copy(&mut input, &mut sealed).map_err(io)?;
        }
        let file = sealed.finish().map_err(io)?.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        if let Some((uid, gid)) = account.run_as() {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).with_context(|| format!("could not give {} to user {}", tmp.display(), account.name))?;
        }
        std::fs::rename(&tmp, dst).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
        std::fs::File::open(dir)?.sync_all().with_context(|| format!("could not flush {}", dir.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Every file under `dir` (a verified base backup) sealed in place:
/// `<file>.age` written, then `<file>` removed.
pub fn seal_tree(encryption: &Encryption, dir: &Path, account: &Account) -> Result<usize> {
    let mut sealed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() && !is_sealed_name(&path) {
                let mut name = path.file_name().unwrap_or_default().to_os_string();
                name.push(SUFFIX);
                seal_file(encryption, &path, &path.with_file_name(name), false, account)?;
                std::fs::remove_file(&path).with_context(|| format!("removing {} once sealed", path.display()))?;
                sealed += 1;
            }
        }
    }
    Ok(sealed)
}


/// Seals the completed segments of every stream directory of the archive
/// (`<segment>` → `<segment>.lz4.age`, then the plain one removed); the
/// `.partial` one stays as it is. `keep_newest`: a completed segment that
/// is the newest file of its stream stays plain until the next one begins
/// (`pg_receivewal` before 15 resumes after the newest segment it finds, and
/// cannot read a sealed one). Returns how many were sealed.
pub fn seal_segments(wal_dir: &Path, account: &Account, keep_newest: bool) -> Result<usize> {
    let Some(encryption) = encryption() else { return Ok(0) };
    let mut sealed = 0;
    for dir in archive::stream_dirs(wal_dir) {
        let segments = archive::segments(&dir);
        let newest = segments.iter().map(|s| (s.position().to_string(), s.name[..8].to_string())).max();
        for seg in segments.iter().filter(|s| !s.partial && !s.sealed) {
            if keep_newest && newest.as_ref() == Some(&(seg.position().to_string(), seg.name[..8].to_string())) {
                continue;
            }
            let to = sealed_segment(&dir, &seg.name);
            let clock = std::time::Instant::now();
            match seal_file(encryption, &seg.path, &to, true, account) {
                Ok(()) => {}
                // Deleted meanwhile (retention, a restore's move): nothing to seal.
                Err(_) if !seg.path.exists() => continue,
                Err(e) => return Err(e),
            }
            tracing::debug!("{} sealed into {} ({} bytes) in {} ms", seg.name, to.display(), std::fs::metadata(&to).map_or(0, |m| m.len()), clock.elapsed().as_millis());
            match std::fs::remove_file(&seg.path) {
                Ok(()) => sealed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("removing {} once sealed", seg.path.display()))),
            }
        }
        // A temporary file of a sealing cut off by a kill.
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".age.tmp") && entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age.as_secs() > 60) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(sealed)
}

/// A sealed segment's WAL bytes (decrypted, then the lz4 frame decoded).
pub fn open_segment(path: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(archive::SEGMENT_BYTES as usize);
    lz4_flex::frame::FrameDecoder::new(open(path)?).read_to_end(&mut out).with_context(|| format!("reading {}: the segment is damaged", path.display()))?;
    Ok(out)
}

/// `omni-gateway restore-wal KEYFILE FILE DEST DIR...`: PostgreSQL's
/// `restore_command` for a sealed archive, run as PostgreSQL's account.
/// Looks for `FILE` in each stream directory `DIR`, complete segments
/// first (plain, else sealed: decrypted with the identity in `KEYFILE`,
/// `-` for none), then `.partial` ones; writes it to `DEST`. Exit status
/// as the plain command's ([`archive::restore_command`]): 0 found, 1 not
/// found, 255 for any other failure (recovery stops with an error rather
/// than ending early).
pub fn restore_wal_main(args: &[String]) -> u8 {
    let [keyfile, file, dest, dirs @ ..] = args else {
        eprintln!("omni-gateway restore-wal: expected KEYFILE FILE DEST DIR...");
        return 255;
    };
    let fail = |e: anyhow::Error| {
        eprintln!("omni-gateway restore-wal {file}: {e:#}");
        255
    };
    if keyfile != "-" {
        match Keys::load(Path::new(keyfile), "the restore's identity") {
            Ok(keys) => set_keys(Some(keys)),
            Err(e) => return fail(e.into()),
        }
    }
    let dirs: Vec<PathBuf> = dirs.iter().map(PathBuf::from).collect();
    let dest = Path::new(dest);
    for dir in &dirs {
        let (plain, sealed) = (dir.join(file), sealed_segment(dir, file));
        let copied = if plain.is_file() {
            std::fs::copy(&plain, dest).map(drop).with_context(|| format!("copying {}", plain.display()))
        } else if sealed.is_file() {
            open_segment(&sealed).and_then(|bytes| {
                let mut out = std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
                out.write_all(&bytes).with_context(|| format!("writing {}", dest.display()))
            })
        } else {
            continue;
        };
        return match copied {
            Ok(()) => 0,
            Err(e) => fail(e),
        };
    }
    for dir in &dirs {
        let partial = dir.join(format!("{file}.partial"));
        if partial.is_file() {
            return match std::fs::copy(&partial, dest) {
                Ok(_) => 0,
                Err(e) => fail(anyhow::Error::new(e).context(format!("copying {}", partial.display()))),
            };
        }
    }
    1
}

/// The identity a recovery's `restore-wal` reads: written for PostgreSQL's
/// account into its private directory `dir` (0700, removed with it), since
/// the key file itself is often readable by root only. `-` without keys.
pub fn identity_for_recovery(dir: &Path, account: &Account) -> Result<String> {
    let Some(keys) = keys() else { return Ok("-".into()) };
    let path = dir.join("identity.txt");
    crate::pg::cluster::write_secret(&path, &keys.file_text())?;
    if let Some((uid, gid)) = account.run_as() {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).with_context(|| format!("could not give {} to user {}", path.display(), account.name))?;
    }
    Ok(path.display().to_string())
}

/// Whether the archive holds sealed files a restore must decrypt: a base
/// backup's files (`backup`: its directory), or any completed segment.
pub fn sealed_files(wal_dir: &Path, backup: Option<&Path>) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Some(dir) = backup {
        found.extend(std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| is_sealed_name(p)).min());
    }
    found.extend(archive::stream_dirs(wal_dir).iter().flat_map(|d| archive::segments(d)).find(|s| s.sealed).map(|s| s.path));
    found
}

/// Before a restore or a drill touches anything: the identity given opens
/// the sealed files it needs (a base backup's, and the archive's segments),
/// or the error names what is missing (`OMNI_DECRYPT_IDENTITY_FILE`,
/// `--identity`) and the keys that would open them.
pub fn check_restorable(wal_dir: &Path, backup: &Path) -> Result<(), CryptError> {
    sealed_files(wal_dir, Some(backup)).iter().try_for_each(|p| check_openable(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scratch;
    use age::secrecy::ExposeSecret;
    use crypt::EncryptSettings;


    fn me() -> Account {
        Account { name: "test".into(), uid: 0, gid: 0, home: "/".into(), switch: false }
    }

    /// WAL-like bytes: records among zeros, as a segment mostly is.
    fn segment_bytes() -> Vec<u8> {
        let mut bytes = vec![0u8; archive::SEGMENT_BYTES as usize];
        for (i, b) in bytes.iter_mut().enumerate().take(6 << 20) {
            *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x3f;
        }
        bytes
    }

    /// The global state is the process's: one test sets it, in order.
    #[test]
    fn segments_are_sealed_in_the_uploads_format_and_read_back_only_with_the_key() {
        let dir = Scratch::new("segments");
        let wal = dir.0.join("wal");
        let stream = archive::stream_dir(&wal);
        std::fs::create_dir_all(&stream).unwrap();
        let identity = age::x25519::Identity::generate();
        let key_file = dir.0.join("key.txt");
        std::fs::write(&key_file, format!("{}\n", identity.to_string().expose_secret())).unwrap();
        let to_key = Encryption::from_settings(&EncryptSettings { recipients: Some(identity.to_public().to_string()), ..Default::default() }).unwrap();

        let plain = segment_bytes();
        let (done, live) = ("000000010000000000000003", "000000010000000000000004");
        std::fs::write(stream.join(done), &plain).unwrap();
        std::fs::write(stream.join(format!("{live}.partial")), &plain).unwrap();
        set_encryption(to_key);
        let clock = std::time::Instant::now();
        assert_eq!(seal_segments(&wal, &me(), false).unwrap(), 1);
        eprintln!("one 16 MiB segment (6 MiB of records) compressed and encrypted in {} ms", clock.elapsed().as_millis());
        let sealed = sealed_segment(&stream, done);
        assert!(!stream.join(done).exists() && stream.join(format!("{live}.partial")).exists(), "the completed segment only is sealed");
        let stored = std::fs::read(&sealed).unwrap();
        assert!(crypt::is_sealed(&stored) && crypt::header_recipients(&stored) == [identity.to_public().to_string()]);
        let segs = archive::segments(&stream);
        assert!(segs.iter().any(|s| s.name == done && s.sealed && !s.partial), "{segs:?}");

        // Without the key: refused naming it, nothing written.
        set_keys(None);
        let dest = dir.0.join("RECOVERYXLOG");
        let dirs = stream.display().to_string();
        let args = |file: &str, keyfile: &str| vec![keyfile.to_string(), file.to_string(), dest.display().to_string(), dirs.clone()];
        let err = check_restorable(&wal, &dir.0.join("no-backup")).unwrap_err().to_string();
        assert!(err.contains("OMNI_DECRYPT_IDENTITY_FILE") && err.contains("--identity") && err.contains(&crypt::short(&identity.to_public().to_string())), "{err}");
        assert_eq!(restore_wal_main(&args(done, "-")), 255);
        assert!(!dest.exists());
        // A wrong key: refused too.
        let stranger = dir.0.join("stranger.txt");
        std::fs::write(&stranger, format!("{}\n", age::x25519::Identity::generate().to_string().expose_secret())).unwrap();
        assert_eq!(restore_wal_main(&args(done, &stranger.display().to_string())), 255);

        // With it: the segment byte for byte, the .partial as it is, 1 for a missing one.
        assert_eq!(restore_wal_main(&args(done, &key_file.display().to_string())), 0);
        assert!(std::fs::read(&dest).unwrap() == plain);
        assert!(check_restorable(&wal, &dir.0.join("no-backup")).is_ok());
        assert_eq!(restore_wal_main(&args(live, &key_file.display().to_string())), 0);
        assert_eq!(restore_wal_main(&args("000000010000000000000009", &key_file.display().to_string())), 1);

        // A base backup's files: sealed in place, read back through the keys.
        let backup = dir.0.join("backup");
        std::fs::create_dir_all(&backup).unwrap();
        std::fs::write(backup.join("backup_manifest"), b"{ manifest }").unwrap();
        std::fs::write(backup.join("pg_wal.tar"), &plain[..1 << 20]).unwrap();
        assert_eq!(seal_tree(encryption().unwrap(), &backup, &me()).unwrap(), 2);
        assert!(!backup.join("pg_wal.tar").exists() && crypt::is_sealed(&std::fs::read(backup.join("pg_wal.tar.age")).unwrap()));
        assert_eq!(read(&backup.join("backup_manifest.age")).unwrap(), b"{ manifest }");
        assert!(sealed_files(&wal, Some(&backup)).len() == 2);
        // pg_receivewal before 15: the newest completed segment waits for the next one.
        let (older, newest) = ("000000010000000000000005", "000000010000000000000006");
        std::fs::remove_file(stream.join(format!("{live}.partial"))).unwrap();
        std::fs::write(stream.join(older), &plain[..1024]).unwrap();
        std::fs::write(stream.join(newest), &plain[..1024]).unwrap();
        assert_eq!(seal_segments(&wal, &me(), true).unwrap(), 1);
        assert!(sealed_segment(&stream, older).exists() && stream.join(newest).exists() && !sealed_segment(&stream, newest).exists());

        // The recovery's copy of the identity opens them too.
        let copy = identity_for_recovery(&dir.0, &me()).unwrap();
        assert_eq!(Keys::load(Path::new(&copy), "copy").unwrap().public(), [identity.to_public().to_string()]);
    }
}
