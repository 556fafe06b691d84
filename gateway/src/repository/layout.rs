//! The names of the objects in the repository, one function per kind, and
//! their parsing back. Every name is relative to the URL's prefix:
//!
//! ```text
//! <prefix>/
//!   <sysid>-pg<major>/                  one generation: the cluster with this system
//!                                       identifier and major (a major upgrade, a
//!                                       replaced data directory: a new generation)
//!     wal/<segment>.lz4                 a completed WAL segment, as one lz4 frame
//!                                       (with its content checksum); written once
//!     wal/<segment>.chunks/<from>-<to>  bytes [from, to) of the segment still being
//!                                       written (8 hex digits each; raw bytes, one
//!                                       object per upload interval, contiguous from 0);
//!                                       removed once wal/<segment>.lz4 is there
//!     wal/<TLI>.history                 a timeline's history file, as PostgreSQL wrote it
//!     base/<id>/<file>                  a verified base backup's files, as pg_basebackup
//!                                       wrote them (base.tar.lz4, pg_wal.tar, backup_manifest)
//!     base/<id>/manifest.json           written LAST: the backup's record and the size and
//!                                       SHA-256 of every file above; a base backup without
//!                                       it is not complete and is never used
//!   logical/<name>                      a logical backup (.sql, from OMNI_BACKUP_DIR)
//!   logical/<name>.sha256               its checksum (`sha256sum` format), written after it
//! ```
//!
//! A restore takes, for each segment it needs, `wal/<segment>.lz4` when it
//! exists, else the chunks of that segment concatenated in order (only
//! ever the last segment of a timeline), padded with zeros to the segment
//! size as PostgreSQL expects of a `.partial` segment.
//!
//! **Re-encrypted copies** (`backup reencrypt`, `repository/reencrypt.rs`):
//! objects are written once, so a copy sealed to new recipients takes a new
//! name, marked with the *keys tag* of those recipients (`k-` and 8 hex
//! digits of the SHA-256 of the sorted public keys, [`keys_tag`]):
//!
//! ```text
//!     wal/<segment>.lz4.k-<tag>         a WAL segment, history file, chunk or
//!     wal/<TLI>.history.k-<tag>         logical backup: the name, then the tag
//!     logical/<name>.k-<tag>
//!     base/<id>.k-<tag>/<file>          a base backup: a backup of its own (its
//!     base/<id>.k-<tag>/manifest.json   manifest's id is `<id>.k-<tag>`), so
//!                                       "manifest last" and retention hold as is
//! ```
//!
//! [`parse`] reads a tagged WAL or logical name as the object it copies (so
//! retention and the chunk bookkeeping treat both alike, deleting by the
//! listed name); [`canonical`] gives the name a copy was made of, and the
//! restore takes, of the copies of one object, one its identity opens.
//! The tag being a function of the recipients, a second run of a rotation
//! finds the names of the first.

use serde::{Deserialize, Serialize};

use crate::pitr::base::BaseBackup;

/// The name of a generation: `<system identifier>-pg<major>`.
pub fn generation(system_identifier: u64, major: u32) -> String {
    format!("{system_identifier}-pg{major}")
}

/// The system identifier and major of a generation's name.
pub fn parse_generation(name: &str) -> Option<(u64, u32)> {
    let (sysid, major) = name.split_once("-pg")?;
    Some((sysid.parse().ok()?, major.parse().ok()?))
}

/// `<gen>/wal/<segment>.lz4`: a completed segment, lz4-framed ([`encode_segment`]).
pub fn wal_segment(gen: &str, segment: &str) -> String {
    format!("{gen}/wal/{segment}.lz4")
}

/// `<gen>/wal/<segment>.chunks/`: where the chunks of a segment being written go.
pub fn wal_chunks(gen: &str, segment: &str) -> String {
    format!("{gen}/wal/{segment}.chunks/")
}

/// `<gen>/wal/<segment>.chunks/<from>-<to>`: bytes `from..to` of a segment
/// still being written.
pub fn wal_chunk(gen: &str, segment: &str, from: u64, to: u64) -> String {
    format!("{}{from:08X}-{to:08X}", wal_chunks(gen, segment))
}

/// `<gen>/wal/<TLI>.history`.
pub fn wal_history(gen: &str, history_file: &str) -> String {
    format!("{gen}/wal/{history_file}")
}

/// `<gen>/base/<id>/`: a base backup.
pub fn base_dir(gen: &str, id: &str) -> String {
    format!("{gen}/base/{id}/")
}

/// `<gen>/base/<id>/<file>`: one file of a base backup.
pub fn base_file(gen: &str, id: &str, file: &str) -> String {
    format!("{}{file}", base_dir(gen, id))
}

/// `<gen>/base/<id>/manifest.json`: the base backup's manifest, written last.
pub fn base_manifest(gen: &str, id: &str) -> String {
    base_file(gen, id, MANIFEST)
}

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// `logical/<name>`: a logical backup.
pub fn logical(name: &str) -> String {
    format!("logical/{name}")
}

/// What marks a re-encrypted copy's name: `<name>.k-<tag>`.
const KEYS_MARK: &str = ".k-";
/// Hex digits of a keys tag.
const TAG_LEN: usize = 8;

/// The keys tag of `recipients` (public keys, or `passphrase`): 8 hex
/// digits of the SHA-256 of the sorted, distinct keys, one per line. The
/// same recipients give the same tag in any order, so names are stable
/// across runs.
pub fn keys_tag(recipients: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut keys: Vec<&str> = recipients.iter().map(|k| k.trim()).collect();
    keys.sort_unstable();
    keys.dedup();
    let digest = Sha256::digest(keys.join("\n").as_bytes());
    digest.iter().take(TAG_LEN / 2).map(|b| format!("{b:02x}")).collect()
}

/// `name` without a trailing `.k-<tag>`, and the tag.
fn split_tag(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once(KEYS_MARK) {
        Some((base, tag)) if !base.is_empty() && !base.ends_with('/') && tag.len() == TAG_LEN && tag.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => (base, Some(tag)),
        _ => (name, None),
    }
}

/// The name of the object `path` is a re-encrypted copy of (`path` itself
/// for an original), and the copy's keys tag (`None`: an original).
pub fn canonical(path: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = path.split('/').collect();
    if let [gen, "base", id, file] = parts.as_slice() {
        let (id, tag) = split_tag(id);
        return (format!("{gen}/base/{id}/{file}"), tag.map(str::to_string));
    }
    let (name, tag) = split_tag(path);
    (name.to_string(), tag.map(str::to_string))
}

/// The name of the copy of `path` sealed to the recipients of `tag`
/// ([`keys_tag`]); a copy's copy is named after the original.
pub fn rekeyed(path: &str, tag: &str) -> String {
    let (original, _) = canonical(path);
    let parts: Vec<&str> = original.split('/').collect();
    if let [gen, "base", id, file] = parts.as_slice() {
        return base_file(gen, &rekeyed_id(id, tag), file);
    }
    format!("{original}{KEYS_MARK}{tag}")
}

/// The id of a base backup's copy sealed to the recipients of `tag`.
pub fn rekeyed_id(id: &str, tag: &str) -> String {
    format!("{}{KEYS_MARK}{tag}", split_tag(id).0)
}

/// What an object name stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Segment { gen: String, segment: String },
    Chunk { gen: String, segment: String, from: u64, to: u64 },
    History { gen: String, file: String },
    BaseFile { gen: String, id: String, file: String },
    BaseManifest { gen: String, id: String },
    Logical { name: String },
}

fn is_segment_name(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads an object name back; `None` for a name this layout never writes.
pub fn parse(path: &str) -> Option<Object> {
    // A re-encrypted copy of a WAL or logical object stands for the original
    // (a base backup's copy is a backup of its own: its id keeps the tag).
    let parts: Vec<&str> = path.split('/').collect();
    let path = if parts.get(1) == Some(&"base") { path } else { split_tag(path).0 };
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["logical", name] if !name.is_empty() => Some(Object::Logical { name: name.to_string() }),
        [gen, "wal", file] if parse_generation(gen).is_some() => {
            if let Some(segment) = file.strip_suffix(".lz4").filter(|s| is_segment_name(s)) {
                return Some(Object::Segment { gen: gen.to_string(), segment: segment.to_string() });
            }
            let tli = file.strip_suffix(".history")?;
            (tli.len() == 8 && tli.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Object::History { gen: gen.to_string(), file: file.to_string() })
        }
        [gen, "wal", dir, chunk] if parse_generation(gen).is_some() => {
            let segment = dir.strip_suffix(".chunks").filter(|s| is_segment_name(s))?;
            let (from, to) = chunk.split_once('-')?;
            let (from, to) = (u64::from_str_radix(from, 16).ok()?, u64::from_str_radix(to, 16).ok()?);
            (from < to).then(|| Object::Chunk { gen: gen.to_string(), segment: segment.to_string(), from, to })
        }
        [gen, "base", id, file] if parse_generation(gen).is_some() && !id.is_empty() && !file.is_empty() => Some(if *file == MANIFEST {
            Object::BaseManifest { gen: gen.to_string(), id: id.to_string() }
        } else {
            Object::BaseFile { gen: gen.to_string(), id: id.to_string(), file: file.to_string() }
        }),
        _ => None,
    }
}

/// `base/<id>/manifest.json`: what a base backup holds, written after
/// every file of it is in the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseManifest {
    /// The local record of the backup (`base/<id>.json`): times, WAL range,
    /// timeline, system identifier.
    pub backup: BaseBackup,
    /// Every file of the backup, relative to `base/<id>/`.
    pub files: Vec<ManifestFile>,
    /// The public keys its files are encrypted to (age; `passphrase` for a
    /// passphrase); empty when they are not encrypted. The `sha256` of each
    /// file is of the stored, encrypted bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// A completed segment as stored: one lz4 frame with its content checksum
/// (deterministic, so a retried upload writes the same bytes).
pub fn encode_segment(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut info = lz4_flex::frame::FrameInfo::new();
    info.content_checksum = true;
    let mut encoder = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::with_capacity(bytes.len() / 4));
    encoder.write_all(bytes)?;
    encoder.finish().map_err(std::io::Error::other)
}

/// The segment's bytes back; an error when the frame or its checksum is damaged.
pub fn decode_segment(stored: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    lz4_flex::frame::FrameDecoder::new(stored).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEN: &str = "7440000000000000001-pg17";

    #[test]
    fn every_name_parses_back_to_what_it_names() {
        assert_eq!(generation(7440000000000000001, 17), GEN);
        assert_eq!(parse_generation(GEN), Some((7440000000000000001, 17)));
        let seg = "00000001000000000000000A";
        assert_eq!(wal_segment(GEN, seg), format!("{GEN}/wal/{seg}.lz4"));
        assert_eq!(parse(&wal_segment(GEN, seg)), Some(Object::Segment { gen: GEN.into(), segment: seg.into() }));
        let chunk = wal_chunk(GEN, seg, 0x2000, 0x6A10);
        assert_eq!(chunk, format!("{GEN}/wal/{seg}.chunks/00002000-00006A10"));
        assert!(chunk.starts_with(&wal_chunks(GEN, seg)));
        assert_eq!(parse(&chunk), Some(Object::Chunk { gen: GEN.into(), segment: seg.into(), from: 0x2000, to: 0x6A10 }));
        assert_eq!(parse(&wal_history(GEN, "00000002.history")), Some(Object::History { gen: GEN.into(), file: "00000002.history".into() }));
        let id = "20261205T050000.123Z";
        assert_eq!(parse(&base_file(GEN, id, "base.tar.lz4")), Some(Object::BaseFile { gen: GEN.into(), id: id.into(), file: "base.tar.lz4".into() }));
        assert_eq!(parse(&base_manifest(GEN, id)), Some(Object::BaseManifest { gen: GEN.into(), id: id.into() }));
        assert_eq!(parse(&logical("backup-2026.sql")), Some(Object::Logical { name: "backup-2026.sql".into() }));
    }

    #[test]
    fn a_re_encrypted_copy_is_named_by_its_keys_and_read_back_as_its_original() {
        let tag = keys_tag(&["age1b".into(), "age1a".into()]);
        assert_eq!(tag, keys_tag(&["age1a".into(), "age1b".into(), "age1a".into()]), "order and repeats do not change the tag");
        assert_ne!(tag, keys_tag(&["age1a".into()]));
        assert_eq!(tag.len(), 8);
        let seg = "00000001000000000000000A";
        let id = "20261205T050000.123Z";
        for original in [wal_segment(GEN, seg), wal_chunk(GEN, seg, 0, 0x2000), wal_history(GEN, "00000002.history"), logical("omni_backup_20261205_050000.sql")] {
            let copy = rekeyed(&original, &tag);
            assert_eq!(copy, format!("{original}.k-{tag}"));
            assert_eq!(parse(&copy), parse(&original), "{copy}");
            assert_eq!(canonical(&copy), (original.clone(), Some(tag.clone())));
            assert_eq!(canonical(&original), (original.clone(), None));
            let again = keys_tag(&["age1c".into()]);
            assert_eq!(rekeyed(&copy, &again), format!("{original}.k-{again}"), "a copy of a copy is named after the original");
        }
        let copy = rekeyed(&base_file(GEN, id, "base.tar.lz4"), &tag);
        assert_eq!(copy, base_file(GEN, &format!("{id}.k-{tag}"), "base.tar.lz4"));
        assert_eq!(parse(&rekeyed(&base_manifest(GEN, id), &tag)), Some(Object::BaseManifest { gen: GEN.into(), id: rekeyed_id(id, &tag) }));
        assert_eq!(canonical(&copy), (base_file(GEN, id, "base.tar.lz4"), Some(tag.clone())));
        // Not tags: wrong length, upper case, nothing before.
        for name in [format!("{GEN}/wal/{seg}.lz4.k-abc"), format!("{GEN}/wal/{seg}.lz4.k-ABCDEF12"), "logical/.k-abcdef12".to_string()] {
            assert_eq!(canonical(&name).1, None, "{name}");
        }
    }

    #[test]
    fn chunk_names_sort_in_byte_order() {
        let mut names = [wal_chunk(GEN, "000000010000000000000001", 0x10000, 0x20000), wal_chunk(GEN, "000000010000000000000001", 0x2000, 0x10000)];
        names.sort();
        assert!(names[0].ends_with("00002000-00010000"), "{names:?}");
    }

    #[test]
    fn names_the_layout_never_writes_are_not_taken_for_objects() {
        for other in ["x", "notagen/wal/000000010000000000000001.lz4", &format!("{GEN}/wal/0001.lz4"), &format!("{GEN}/wal/000000010000000000000001"), &format!("{GEN}/wal/000000010000000000000001.chunks/00000010-00000010"), &format!("{GEN}/other/x")] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    #[test]
    fn a_segment_round_trips_and_a_damaged_one_is_refused() {
        let mut segment = vec![0u8; 1 << 20];
        segment[..11].copy_from_slice(b"WAL records");
        let stored = encode_segment(&segment).unwrap();
        assert!(stored.len() < segment.len() / 10, "mostly zeros compress");
        assert_eq!(encode_segment(&segment).unwrap(), stored, "deterministic: a retry writes the same bytes");
        assert_eq!(decode_segment(&stored).unwrap(), segment);
        let mut damaged = stored.clone();
        let at = damaged.len() / 2;
        damaged[at] ^= 0xFF;
        assert!(decode_segment(&damaged).is_err());
    }
}
