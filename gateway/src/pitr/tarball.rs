//! Compressed base backups: `pg_basebackup --format=tar`, which writes
//! `base.tar.lz4` (or `.gz`), `pg_wal.tar` (or `.tar.gz`) and
//! `backup_manifest`. Checked here without unpacking, and unpacked into a data
//! directory for a restore.
//!
//! `pg_verifybackup` reads tar backups only from PostgreSQL 18 on, so the
//! check does what it does for a plain backup: the manifest's own SHA-256;
//! every file of `base.tar.*` against the manifest's size and CRC-32C, none
//! missing and none unknown (the same files ignored: `pg_wal/`,
//! `postgresql.auto.conf`, the signal files); then the WAL the backup needs,
//! from `pg_wal.tar*`, parsed by `pg_waldump` from the manifest's start to
//! its end. The archive is read once, as a stream: no disk space, no copy.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::archive::SEGMENT_BYTES;
use crate::process::privilege::{self, Account};

/// The archive named `<stem>.tar[.lz4|.gz]` in `dir`, if any, or its
/// sealed copy (`….age`, `OMNI_ENCRYPT_LOCAL`: decrypted as it is read).
pub fn archive(dir: &Path, stem: &str) -> Option<PathBuf> {
    ["tar.lz4", "tar.gz", "tar"]
        .iter()
        .flat_map(|ext| [dir.join(format!("{stem}.{ext}")), dir.join(format!("{stem}.{ext}{}", super::sealed::SUFFIX))])
        .find(|p| p.is_file())
}

/// Whether `dir` holds a tar-format base backup (otherwise it is a plain one).
pub fn is_tar(dir: &Path) -> bool {
    archive(dir, "base").is_some()
}

/// The archive's tar stream, decrypted and decompressed as its name says.
fn open(path: &Path) -> Result<Box<dyn Read>> {
    let file = BufReader::with_capacity(1 << 20, super::sealed::open(path)?);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = name.strip_suffix(super::sealed::SUFFIX).unwrap_or(&name);
    Ok(if name.ends_with(".lz4") {
        Box::new(lz4_flex::frame::FrameDecoder::new(file))
    } else if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// What `backup_manifest` says, as far as the check needs it.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    #[serde(rename = "Files")]
    files: Vec<ManifestFile>,
    #[serde(rename = "WAL-Ranges")]
    pub wal_ranges: Vec<WalRange>,
}

#[derive(Debug, Deserialize)]
struct ManifestFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    /// Hex of the name's bytes, for a name that is not UTF-8.
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

/// The WAL a backup needs, on one timeline.
#[derive(Debug, Clone, Deserialize)]
pub struct WalRange {
    #[serde(rename = "Timeline")]
    pub timeline: u32,
    #[serde(rename = "Start-LSN")]
    pub start: String,
    #[serde(rename = "End-LSN")]
    pub end: String,
}

impl ManifestFile {
    fn name(&self) -> Result<String> {
        match (&self.path, &self.encoded_path) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(hex)) => {
                let bytes: Option<Vec<u8>> = (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
                bytes.map(|b| String::from_utf8_lossy(&b).into_owned()).context("an Encoded-Path in the manifest is not hex")
            }
            (None, None) => bail!("a file in the manifest has no path"),
        }
    }
}

/// Reads `dir/backup_manifest` and checks its own checksum: the SHA-256 of
/// everything before its `"Manifest-Checksum"` line.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("backup_manifest");
    let sealed = dir.join(format!("backup_manifest{}", super::sealed::SUFFIX));
    let bytes = if !path.exists() && sealed.exists() {
        super::sealed::read(&sealed)?
    } else {
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
    };
    let key = b"\"Manifest-Checksum\"";
    let at = bytes.windows(key.len()).rposition(|w| w == key).with_context(|| format!("{} has no Manifest-Checksum: it is truncated", path.display()))?;
    let rest = String::from_utf8_lossy(&bytes[at + key.len()..]);
    let recorded = rest.split('"').nth(1).unwrap_or_default().to_ascii_lowercase();
    let actual: String = Sha256::digest(&bytes[..at]).iter().map(|b| format!("{b:02x}")).collect();
    if recorded != actual {
        bail!("{} changed since it was written (its checksum is {recorded}, its content's {actual})", path.display());
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a backup manifest", path.display()))
}

/// Files `pg_verifybackup` does not check by default: WAL is checked by
/// parsing it, and the others may legitimately differ from the manifest.
fn ignored(path: &str) -> bool {
    path == "backup_manifest" || path == "pg_wal" || path.starts_with("pg_wal/") || ["postgresql.auto.conf", "recovery.signal", "standby.signal"].contains(&path)
}

/// Checks every file of `base.tar.*` in `dir` against `manifest`; returns
/// the bytes checked. Blocking: reads the whole archive.
pub fn check_files(dir: &Path, manifest: &Manifest) -> Result<u64> {
    let mut expected: HashMap<String, &ManifestFile> = HashMap::new();
    for file in &manifest.files {
        let name = file.name()?;
        if !ignored(&name) {
            expected.insert(name, file);
        }
    }
    let path = archive(dir, "base").with_context(|| format!("{} holds no base.tar archive", dir.display()))?;
    let shown = path.display();
    let mut tar = tar::Archive::new(open(&path)?);
    let mut checked = 0;
    for entry in tar.entries().with_context(|| format!("reading {shown}"))? {
        let mut entry = entry.with_context(|| format!("reading {shown}: the archive is damaged"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().with_context(|| format!("reading {shown}"))?.to_string_lossy().trim_start_matches("./").to_string();
        if ignored(&name) {
            continue;
        }
        let Some(file) = expected.remove(&name) else {
            bail!("{name} is in {shown} but not in its manifest");
        };
        let (size, crc) = crc32c_of(&mut entry).with_context(|| format!("reading {name} from {shown}: the archive is damaged"))?;
        if size != file.size {
            bail!("{name} in {shown} has {size} bytes, its manifest says {}", file.size);
        }
        match file.algorithm.as_deref() {
            None | Some("NONE") => {}
            Some("CRC32C") => {
                // PostgreSQL writes the CRC's bytes in memory order (little-endian).
                let actual: String = crc.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
                if file.checksum.as_deref().map(str::to_ascii_lowercase) != Some(actual.clone()) {
                    bail!("{name} in {shown} does not match its manifest: CRC-32C {actual}, recorded {}", file.checksum.as_deref().unwrap_or("none"));
                }
            }
            Some(other) => bail!("{name}: checksum algorithm {other} is not one this check reads (base backups are taken with CRC32C)"),
        }
        checked += size;
    }
    if !expected.is_empty() {
        let mut missing: Vec<&String> = expected.keys().collect();
        missing.sort();
        bail!("{} file(s) of the manifest are missing from {shown}, first {}", missing.len(), missing[0]);
    }
    Ok(checked)
}

fn crc32c_of(reader: &mut impl Read) -> std::io::Result<(u64, u32)> {
    let mut buf = vec![0u8; 256 * 1024];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok((size, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
}

/// Unpacks `<stem>.tar*` of `dir` into `into` (created if absent), giving
/// everything to `account`. Blocking.
pub fn unpack(dir: &Path, stem: &str, into: &Path, account: &Account) -> Result<()> {
    let path = archive(dir, stem).with_context(|| format!("{} holds no {stem}.tar archive", dir.display()))?;
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let mut tar = tar::Archive::new(open(&path)?);
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    tar.unpack(into).with_context(|| format!("unpacking {} into {}", path.display(), into.display()))?;
    privilege::chown_tree(into, account)
}

/// The WAL file a position (`0/2000028`) falls in, as PostgreSQL names it.
pub fn segment_name(timeline: u32, lsn: &str) -> Option<String> {
    let lsn = super::archive::parse_lsn(lsn)?;
    Some(format!("{timeline:08X}{:08X}{:08X}", lsn >> 32, (lsn & 0xFFFF_FFFF) / SEGMENT_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// A backup directory with `base.tar.lz4` holding `files` and a manifest
    /// recording `recorded` (name, content) with correct CRCs and its own checksum.
    fn backup(dir: &Path, files: &[(&str, &[u8])], recorded: &[(&str, &[u8])]) {
        let mut tar = tar::Builder::new(lz4_flex::frame::FrameEncoder::new(File::create(dir.join("base.tar.lz4")).unwrap()));
        for (name, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            tar.append_data(&mut header, name, *content).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        let entries: Vec<String> = recorded
            .iter()
            .map(|(name, content)| {
                let crc: String = crc32c::crc32c(content).to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
                format!("{{ \"Path\": \"{name}\", \"Size\": {}, \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{crc}\" }}", content.len())
            })
            .collect();
        let body = format!(
            "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{}\n],\n\"WAL-Ranges\": [\n{{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }}\n],\n",
            entries.join(",\n")
        );
        let sum: String = Sha256::digest(body.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.join("backup_manifest"), format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n")).unwrap();
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("omni-tarball-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn uuid_like() -> String {
        format!("{}-{:x}", std::process::id(), rand::random::<u64>())
    }

    #[test]
    fn a_backup_matching_its_manifest_passes_and_its_wal_start_is_named() {
        let dir = scratch();
        let files: &[(&str, &[u8])] = &[("PG_VERSION", b"15\n"), ("base/1/1259", &[7u8; 9000]), ("pg_wal/000000010000000000000002", b"wal")];
        backup(&dir, files, &files[..2]);
        let manifest = read_manifest(&dir).unwrap();
        assert_eq!(check_files(&dir, &manifest).unwrap(), 9003);
        let range = &manifest.wal_ranges[0];
        assert_eq!(segment_name(range.timeline, &range.start).unwrap(), "000000010000000000000002");
        let into = dir.join("restored");
        let me = Account { name: "test".into(), uid: 0, gid: 0, home: "/".into(), switch: false };
        unpack(&dir, "base", &into, &me).unwrap();
        assert_eq!(std::fs::read(into.join("base/1/1259")).unwrap(), vec![7u8; 9000]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_changed_file_a_missing_one_an_unknown_one_and_an_edited_manifest_are_each_refused() {
        let cases: [(&[(&str, &[u8])], &[(&str, &[u8])], &str); 3] = [
            (&[("PG_VERSION", b"16\n")], &[("PG_VERSION", b"15\n")], "does not match its manifest"),
            (&[("PG_VERSION", b"15\n")], &[("PG_VERSION", b"15\n"), ("global/1262", b"x")], "missing from"),
            (&[("PG_VERSION", b"15\n"), ("global/1262", b"x")], &[("PG_VERSION", b"15\n")], "not in its manifest"),
        ];
        for (files, recorded, says) in cases {
            let dir = scratch();
            backup(&dir, files, recorded);
            let err = check_files(&dir, &read_manifest(&dir).unwrap()).unwrap_err();
            assert!(format!("{err:#}").contains(says), "{err:#} should say {says}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let dir = scratch();
        backup(&dir, &[("PG_VERSION", b"15\n")], &[("PG_VERSION", b"15\n")]);
        let text = std::fs::read_to_string(dir.join("backup_manifest")).unwrap().replace("\"Size\": 3", "\"Size\": 4");
        std::fs::write(dir.join("backup_manifest"), text).unwrap();
        assert!(format!("{:#}", read_manifest(&dir).unwrap_err()).contains("changed since it was written"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_truncated_archive_is_refused() {
        let dir = scratch();
        let content: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        backup(&dir, &[("base/1/2608", &content)], &[("base/1/2608", &content)]);
        let path = dir.join("base.tar.lz4");
        let len = std::fs::metadata(&path).unwrap().len();
        File::options().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
        let err = check_files(&dir, &read_manifest(&dir).unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("damaged"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
