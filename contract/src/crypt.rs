//! Encryption of what leaves the machine (and, with `OMNI_ENCRYPT_LOCAL`,
//! of the WAL archive on it, the gateway's `pitr/sealed.rs`, and of the
//! logical backups, [`crate::backups`]): the `age` format, one object at a
//! time, to public keys (`OMNI_ENCRYPT_RECIPIENTS`,
//! `OMNI_ENCRYPT_RECIPIENTS_FILE`) or to a passphrase
//! (`OMNI_ENCRYPT_PASSPHRASE_FILE`).
//!
//! * **The server holds public keys only.** With recipients, nothing on the
//!   machine can decrypt what it uploaded: a stolen server or bucket
//!   credential reads no old backup. Restores take the private key
//!   (`OMNI_DECRYPT_IDENTITY_FILE`, `restore --identity FILE`).
//! * **Decryptable without us.** Every object is a plain age file: Debian's
//!   `age -d -i key.txt` reads it. Besides the standard `X25519` stanza of
//!   each recipient, the header carries one `omni-recipient <public key>`
//!   stanza per recipient (empty body). age implementations skip stanza
//!   types they do not know (the format adds random "grease" stanzas to keep
//!   them honest), so the extra stanzas cost the CLI nothing, and they let a
//!   restore with the wrong key say which keys it needed, something age
//!   itself never reveals.
//! * **Fail closed.** [`Encryption::sealer`] reads the recipients file again
//!   each time: a file made unreadable or emptied is an error that stops
//!   uploads, never a plain upload.
//! * **Passphrases** are for the simple case: scrypt at work factor 2^15
//!   (about 0.1 s of CPU per object here), not age's one-second default,
//!   because a WAL chunk is an object every second. A passphrase is only
//!   as strong as its length: the README says to use a long random one.

use std::{
    collections::HashSet,
    fmt,
    io::{self, BufRead, Read, Write},
    path::{Path, PathBuf},
    str::FromStr,
};

use age::{secrecy::SecretString, x25519};
// The `Recipient` trait's types (the file key, a header stanza) live in age-core.
use age_core::format::{FileKey, Stanza};

/// Every age file starts with this line.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";
/// The stanza naming a recipient's public key in the header.
const RECIPIENT_TAG: &str = "omni-recipient";
/// scrypt's work factor for passphrase mode (see the module's text).
const PASSPHRASE_LOG_N: u8 = 15;
/// The largest work factor a passphrase restore accepts (age's own CLI caps at 22).
const PASSPHRASE_MAX_LOG_N: u8 = 22;

#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// A setting is wrong: named, with what to do.
    #[error("{0}")]
    Config(String),
    /// The key given does not open the object: which keys would.
    #[error("{what} is encrypted to {}; the identity given ({}) is not one of them", list(.needed), list(.have))]
    WrongKey { what: String, needed: Vec<String>, have: Vec<String> },
    #[error("{what} is encrypted; set OMNI_DECRYPT_IDENTITY_FILE or pass --identity FILE (it needs the private key of {})", list(.needed))]
    NoKey { what: String, needed: Vec<String> },
    #[error("{what} is not an age-encrypted object, but encryption is configured: refusing to take it as a backup")]
    NotEncrypted { what: String },
    #[error("{what}: {message}")]
    Damaged { what: String, message: String },
    #[error("encrypting {what}: {source}")]
    Io { what: String, source: io::Error },
}

fn list(keys: &[String]) -> String {
    if keys.is_empty() {
        "a passphrase or keys it does not name".into()
    } else {
        keys.iter().map(|k| short(k)).collect::<Vec<_>>().join(", ")
    }
}

/// `age1abcd…wxyz`: enough to tell keys apart in a message.
pub fn short(key: &str) -> String {
    if key.len() > 20 && key.is_ascii() {
        format!("{}…{}", &key[..9], &key[key.len() - 8..])
    } else {
        key.to_string()
    }
}

/// Where the encryption settings come from (the `OMNI_ENCRYPT_*` variables).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncryptSettings {
    /// `OMNI_ENCRYPT_RECIPIENTS`: age X25519 public keys, comma-separated.
    pub recipients: Option<String>,
    /// `OMNI_ENCRYPT_RECIPIENTS_FILE`: one public key per line, `#` comments.
    pub recipients_file: Option<PathBuf>,
    /// `OMNI_ENCRYPT_PASSPHRASE_FILE`: the passphrase, the file's first line.
    pub passphrase_file: Option<PathBuf>,
}

/// What is encrypted to, as configured (checked once at start: a bad
/// setting stops the start naming it).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Encryption {
    #[default]
    Off,
    Recipients { keys: Vec<String> },
    RecipientsFile { path: PathBuf },
    Passphrase { path: PathBuf },
}

impl Encryption {
    /// From the settings; at most one way may be set, and what is set must
    /// be usable now.
    pub fn from_settings(s: &EncryptSettings) -> Result<Encryption, CryptError> {
        let set: Vec<&str> = [
            s.recipients.as_deref().filter(|v| !v.trim().is_empty()).map(|_| "OMNI_ENCRYPT_RECIPIENTS"),
            s.recipients_file.as_ref().map(|_| "OMNI_ENCRYPT_RECIPIENTS_FILE"),
            s.passphrase_file.as_ref().map(|_| "OMNI_ENCRYPT_PASSPHRASE_FILE"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.len() > 1 {
            return Err(CryptError::Config(format!("{} are all set: encrypt to public keys or to a passphrase, set one of them", set.join(" and "))));
        }
        let encryption = if let Some(keys) = s.recipients.as_deref().filter(|v| !v.trim().is_empty()) {
            let keys = parse_recipients(keys.split(','), "OMNI_ENCRYPT_RECIPIENTS")?;
            Encryption::Recipients { keys: keys.iter().map(|k| k.to_string()).collect() }
        } else if let Some(path) = &s.recipients_file {
            Encryption::RecipientsFile { path: path.clone() }
        } else if let Some(path) = &s.passphrase_file {
            Encryption::Passphrase { path: path.clone() }
        } else {
            Encryption::Off
        };
        encryption.sealer()?;
        Ok(encryption)
    }

    pub fn is_on(&self) -> bool {
        !matches!(self, Encryption::Off)
    }

    /// The encrypter for the next objects: the recipients file and the
    /// passphrase file are read again, so a key rotated in the file applies
    /// to new objects, and a file gone bad stops uploads.
    pub fn sealer(&self) -> Result<Sealer, CryptError> {
        match self {
            Encryption::Off => Ok(Sealer::Plain),
            Encryption::Recipients { keys } => Ok(Sealer::Keys(parse_recipients(keys.iter().map(String::as_str), "OMNI_ENCRYPT_RECIPIENTS")?)),
            Encryption::RecipientsFile { path } => {
                let text = read_setting_file(path, "OMNI_ENCRYPT_RECIPIENTS_FILE", UPLOADS_WAIT)?;
                let lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
                let keys = parse_recipients(lines, &format!("OMNI_ENCRYPT_RECIPIENTS_FILE ({})", path.display()))?;
                Ok(Sealer::Keys(keys))
            }
            Encryption::Passphrase { path } => Ok(Sealer::Passphrase(read_passphrase(path, "OMNI_ENCRYPT_PASSPHRASE_FILE", UPLOADS_WAIT)?)),
        }
    }
}

/// The file a setting names; `until` says what waits for it in the error.
fn read_setting_file(path: &Path, variable: &str, until: &str) -> Result<String, CryptError> {
    std::fs::read_to_string(path).map_err(|e| CryptError::Config(format!("{variable}={}: cannot read it ({e}); {until}", path.display())))
}

const UPLOADS_WAIT: &str = "nothing is uploaded until it can be read";

fn read_passphrase(path: &Path, variable: &str, until: &str) -> Result<SecretString, CryptError> {
    passphrase_of(&read_setting_file(path, variable, until)?, path, variable)
}

/// The passphrase: the first line of `text`, the file `path` of `variable`.
fn passphrase_of(text: &str, path: &Path, variable: &str) -> Result<SecretString, CryptError> {
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(CryptError::Config(format!("{variable}={}: the file's first line is empty; it must hold the passphrase", path.display())));
    }
    Ok(SecretString::from(line.to_string()))
}

fn parse_recipients<'a>(keys: impl Iterator<Item = &'a str>, source: &str) -> Result<Vec<x25519::Recipient>, CryptError> {
    let mut out = Vec::new();
    for key in keys.map(str::trim).filter(|k| !k.is_empty()) {
        let recipient = x25519::Recipient::from_str(key).map_err(|_| {
            let hint = if key.starts_with("AGE-SECRET-KEY-") {
                "that is a private key: give the public key (`age-keygen -y key.txt` prints it) and keep the private key off this machine"
            } else {
                "expected an age X25519 public key (age1…, from `age-keygen`)"
            };
            CryptError::Config(format!("{source}: {:?} is not a recipient: {hint}", short(key)))
        })?;
        out.push(recipient);
    }
    if out.is_empty() {
        return Err(CryptError::Config(format!("{source} names no recipient; nothing is uploaded until it names at least one age public key")));
    }
    Ok(out)
}

/// Encrypts objects as configured at the moment it was made.
pub enum Sealer {
    Plain,
    Keys(Vec<x25519::Recipient>),
    Passphrase(SecretString),
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer({})", self.describe())
    }
}

/// One recipient's stanzas: the standard X25519 one, then its public key.
struct Named<'a>(&'a x25519::Recipient);

impl age::Recipient for Named<'_> {
    fn wrap_file_key(&self, file_key: &FileKey) -> Result<(Vec<Stanza>, HashSet<String>), age::EncryptError> {
        let (mut stanzas, labels) = self.0.wrap_file_key(file_key)?;
        stanzas.push(Stanza { tag: RECIPIENT_TAG.into(), args: vec![self.0.to_string()], body: Vec::new() });
        Ok((stanzas, labels))
    }
}

impl Sealer {
    pub fn is_plain(&self) -> bool {
        matches!(self, Sealer::Plain)
    }

    /// The public keys objects are encrypted to (`passphrase` for a
    /// passphrase, nothing when plain): what a manifest records.
    pub fn recipients(&self) -> Vec<String> {
        match self {
            Sealer::Plain => Vec::new(),
            Sealer::Keys(keys) => keys.iter().map(|k| k.to_string()).collect(),
            Sealer::Passphrase(_) => vec!["passphrase".into()],
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Sealer::Plain => "not encrypted".into(),
            Sealer::Keys(keys) => format!("age, to {}", list(&keys.iter().map(|k| k.to_string()).collect::<Vec<_>>())),
            Sealer::Passphrase(_) => "age, to a passphrase".into(),
        }
    }

    /// Wraps `out`: what is written to the returned writer lands in `out`
    /// encrypted. [`Sealed::finish`] must be called (it writes the last chunk).
    pub fn wrap<W: Write>(&self, out: W) -> io::Result<Sealed<W>> {
        let writer = match self {
            Sealer::Plain => return Ok(Sealed::Plain(out)),
            Sealer::Keys(keys) => {
                let named: Vec<Named> = keys.iter().map(Named).collect();
                AgeWriter::new(named.iter().map(|n| n as &dyn age::Recipient), out)?
            }
            Sealer::Passphrase(passphrase) => {
                let mut recipient = age::scrypt::Recipient::new(passphrase.clone());
                recipient.set_work_factor(PASSPHRASE_LOG_N);
                AgeWriter::new(std::iter::once(&recipient as &dyn age::Recipient), out)?
            }
        };
        Ok(Sealed::Age(Box::new(writer)))
    }

    /// `plain` encrypted, in memory (manifests, WAL chunks, small files).
    pub fn seal(&self, plain: &[u8], what: &str) -> Result<Vec<u8>, CryptError> {
        let io = |source| CryptError::Io { what: what.to_string(), source };
        let mut w = self.wrap(Vec::with_capacity(plain.len() + 512)).map_err(io)?;
        w.write_all(plain).map_err(io)?;
        w.finish().map_err(io)
    }

    /// `src` encrypted into `dst` (created, or replaced), streamed: memory
    /// stays flat whatever the size.
    pub fn seal_file(&self, src: &Path, dst: &Path) -> Result<u64, CryptError> {
        let what = src.display().to_string();
        let io = |source| CryptError::Io { what: what.clone(), source };
        let mut input = std::fs::File::open(src).map_err(io)?;
        let output = std::fs::File::create(dst).map_err(io)?;
        let mut w = self.wrap(io::BufWriter::with_capacity(256 * 1024, output)).map_err(io)?;
        let n = io::copy(&mut input, &mut w).map_err(io)?;
        let file = w.finish().map_err(io)?.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(n)
    }
}

/// A writer that encrypts (or passes through, when plain).
pub enum Sealed<W: Write> {
    Plain(W),
    /// Boxed: an AgeWriter is some 600 bytes (ring's key), a plain writer a handful.
    Age(Box<AgeWriter<W>>),
}

impl<W: Write> Write for Sealed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealed::Plain(w) => w.write(buf),
            Sealed::Age(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealed::Plain(w) => w.flush(),
            Sealed::Age(w) => w.flush(),
        }
    }
}

impl<W: Write> Sealed<W> {
    pub fn finish(self) -> io::Result<W> {
        match self {
            Sealed::Plain(w) => Ok(w),
            Sealed::Age(w) => (*w).finish(),
        }
    }
}

/// Plaintext bytes per chunk of an age payload.
const CHUNK: usize = 64 * 1024;
/// ChaCha20-Poly1305's tag after each chunk.
const TAG: usize = 16;

/// An age v1 file written to `out` (age-encryption.org/v1): the header made
/// here from the `age` crate's recipients (their stanzas, the file key they
/// wrap), the payload sealed with ring's ChaCha20-Poly1305. The `age`
/// crate's own writer seals with RustCrypto's portable code and a new
/// buffer per chunk: 1 GiB took it 0.84 s of CPU here against 0.44 s for
/// Debian's `age` CLI, and encryption's share of an upload is what issue 28
/// bounds. The format is age's, so its reader and the CLI open these files
/// (`tests::ring_payload_opens_with_the_age_crate_and_the_cli`).
///
/// The payload is STREAM: a 16-byte nonce, then 64 KiB chunks, each sealed
/// with the key HKDF-SHA-256(nonce, "payload", file key) under the nonce
/// `counter (11 bytes, big-endian) ‖ last (1 byte)`. The last chunk may be
/// full; it is empty only when the whole payload is.
pub struct AgeWriter<W: Write> {
    out: W,
    key: ring::aead::LessSafeKey,
    counter: u128,
    /// Plaintext not sealed yet, room for its tag included.
    chunk: Vec<u8>,
}

impl<W: Write> AgeWriter<W> {
    fn new<'a>(recipients: impl Iterator<Item = &'a dyn age::Recipient>, mut out: W) -> io::Result<AgeWriter<W>> {
        use age::secrecy::ExposeSecret;
        use base64::{prelude::BASE64_STANDARD_NO_PAD, Engine};
        let random = ring::rand::SystemRandom::new();
        let fill = |bytes: &mut [u8]| ring::rand::SecureRandom::fill(&random, bytes).map_err(|_| io::Error::other("no randomness from the system"));
        let file_key = FileKey::try_init_with_mut(|key| fill(key))?;
        let mut header = AGE_MAGIC.to_vec();
        for recipient in recipients {
            let (stanzas, _labels) = recipient.wrap_file_key(&file_key).map_err(io::Error::other)?;
            for stanza in stanzas {
                // age-core's own writer: the body in 64-column lines, the last one short.
                header = cookie_factory::gen_simple(age_core::format::write::age_stanza(&stanza.tag, &stanza.args, &stanza.body), header)
                    .map_err(|e| io::Error::other(format!("writing the age header: {e}")))?;
            }
        }
        header.extend_from_slice(b"---");
        let mac_key = age_core::primitives::hkdf(&[], b"header", file_key.expose_secret());
        let mac = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &mac_key), &header);
        header.push(b' ');
        header.extend_from_slice(BASE64_STANDARD_NO_PAD.encode(mac.as_ref()).as_bytes());
        header.push(b'\n');
        let mut nonce = [0u8; 16];
        fill(&mut nonce)?;
        header.extend_from_slice(&nonce);
        let payload_key = age_core::primitives::hkdf(&nonce, b"payload", file_key.expose_secret());
        let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &payload_key).expect("a 32-byte key");
        out.write_all(&header)?;
        Ok(AgeWriter { out, key: ring::aead::LessSafeKey::new(key), counter: 0, chunk: Vec::with_capacity(CHUNK + TAG) })
    }

    /// Seals what `chunk` holds and writes it out.
    fn seal(&mut self, last: bool) -> io::Result<()> {
        // 11 bytes of counter: 2^88 chunks of 64 KiB, more than any disk holds.
        if self.counter >> 88 != 0 {
            return Err(io::Error::other("an age payload cannot have more than 2^88 chunks"));
        }
        let mut nonce = [0u8; 12];
        nonce[..11].copy_from_slice(&self.counter.to_be_bytes()[5..]);
        nonce[11] = u8::from(last);
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
        self.key
            .seal_in_place_append_tag(nonce, ring::aead::Aad::empty(), &mut self.chunk)
            .map_err(|_| io::Error::other("sealing a chunk failed"))?;
        self.out.write_all(&self.chunk)?;
        self.chunk.clear();
        self.counter += 1;
        Ok(())
    }

    /// Seals the last chunk; `out` is returned (not flushed).
    pub fn finish(mut self) -> io::Result<W> {
        self.seal(true)?;
        Ok(self.out)
    }
}

impl<W: Write> Write for AgeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // A full chunk is sealed only once more follows: the last one,
        // sealed by `finish`, carries the flag.
        if self.chunk.len() == CHUNK {
            self.seal(false)?;
        }
        let n = buf.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Whether `bytes` (an object's first bytes) are an age file.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(AGE_MAGIC)
}

/// The length of an age file's header (through its `---` MAC line), from
/// its first bytes; `None` when they hold no whole header.
pub fn header_len(bytes: &[u8]) -> Option<usize> {
    if !is_sealed(bytes) {
        return None;
    }
    let at = bytes.windows(4).position(|w| w == b"\n---")? + 1;
    let end = bytes[at..].iter().position(|b| *b == b'\n')?;
    Some(at + end + 1)
}

/// The public keys an object says it is encrypted to (its `omni-recipient`
/// stanzas), read from the header without any key; `["passphrase"]` for
/// scrypt. Empty for an age file made by other tools.
pub fn header_recipients(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    if !is_sealed(bytes) {
        return out;
    }
    let header = &bytes[..bytes.len().min(64 * 1024)];
    for line in header.split(|b| *b == b'\n').skip(1) {
        if line.starts_with(b"---") {
            break;
        }
        let Ok(line) = std::str::from_utf8(line) else { break };
        let mut words = line.split(' ');
        if words.next() != Some("->") {
            continue;
        }
        match (words.next(), words.next()) {
            (Some(RECIPIENT_TAG), Some(key)) => out.push(key.to_string()),
            (Some("scrypt"), _) => out.push("passphrase".into()),
            _ => {}
        }
    }
    out
}

/// The private side: what restores decrypt with
/// (`OMNI_DECRYPT_IDENTITY_FILE`, `restore --identity FILE`). The file is an
/// age identity file (`AGE-SECRET-KEY-1…` lines, as `age-keygen` writes
/// them) or, for passphrase mode, the passphrase file itself.
pub struct Keys {
    identities: Vec<x25519::Identity>,
    passphrase: Option<SecretString>,
    /// The public keys of `identities`, for messages.
    public: Vec<String>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys({})", list(&self.public))
    }
}

impl Keys {
    pub fn load(path: &Path, variable: &str) -> Result<Keys, CryptError> {
        let text = read_setting_file(path, variable, "nothing encrypted can be read without it")?;
        Keys::parse(&text, path, variable)
    }

    /// The keys of an identity file's `text`, read already (the worker is
    /// handed the file open, when its account cannot open it itself).
    pub fn parse(text: &str, path: &Path, variable: &str) -> Result<Keys, CryptError> {
        let secret_lines: Vec<&str> = text.lines().map(str::trim).filter(|l| l.starts_with("AGE-SECRET-KEY-")).collect();
        if secret_lines.is_empty() {
            let passphrase = passphrase_of(text, path, variable)?;
            return Ok(Keys { identities: Vec::new(), passphrase: Some(passphrase), public: vec!["passphrase".into()] });
        }
        let mut identities = Vec::new();
        for (n, line) in secret_lines.iter().enumerate() {
            let identity = x25519::Identity::from_str(line)
                .map_err(|_| CryptError::Config(format!("{variable}={}: secret key {} of the file is not a valid age X25519 identity", path.display(), n + 1)))?;
            identities.push(identity);
        }
        let public = identities.iter().map(|i| i.to_public().to_string()).collect();
        Ok(Keys { identities, passphrase: None, public })
    }

    /// The identity file's text again (its secret keys, or the
    /// passphrase), for a process that cannot read the file itself (the
    /// recovery's `restore_command`, run as PostgreSQL's account).
    pub fn file_text(&self) -> String {
        use age::secrecy::ExposeSecret;
        match &self.passphrase {
            Some(passphrase) => format!("{}\n", passphrase.expose_secret()),
            None => self.identities.iter().map(|i| format!("{}\n", i.to_string().expose_secret())).collect(),
        }
    }

    /// The public keys these identities open.
    pub fn public(&self) -> &[String] {
        &self.public
    }

    /// Decrypts `reader` (an age file) as a stream; `what` names the object
    /// in errors. The header is checked here: a wrong key fails before any
    /// byte is read past it.
    pub fn open<R: Read>(&self, reader: R, what: &str) -> Result<impl Read, CryptError> {
        let mut reader = io::BufReader::with_capacity(64 * 1024, reader);
        let head = reader.fill_buf().map_err(|source| CryptError::Io { what: what.to_string(), source })?.to_vec();
        if !is_sealed(&head) {
            return Err(CryptError::NotEncrypted { what: what.to_string() });
        }
        let needed = header_recipients(&head);
        let decryptor = age::Decryptor::new_buffered(reader).map_err(|e| CryptError::Damaged { what: what.to_string(), message: format!("not a readable age header ({e})") })?;
        let wrong = || CryptError::WrongKey { what: what.to_string(), needed: needed.clone(), have: self.public.clone() };
        let scrypt = decryptor.is_scrypt();
        let result = if scrypt {
            let Some(passphrase) = &self.passphrase else { return Err(wrong()) };
            let mut identity = age::scrypt::Identity::new(passphrase.clone());
            identity.set_max_work_factor(PASSPHRASE_MAX_LOG_N);
            decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity))
        } else {
            if self.identities.is_empty() {
                return Err(wrong());
            }
            decryptor.decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
        };
        match result {
            Ok(stream) => Ok(stream),
            Err(age::DecryptError::NoMatchingKeys) => Err(wrong()),
            // A wrong passphrase fails scrypt's authenticated unwrap.
            Err(age::DecryptError::DecryptionFailed) if scrypt => Err(wrong()),
            Err(e) => Err(CryptError::Damaged { what: what.to_string(), message: e.to_string() }),
        }
    }

    /// `sealed` decrypted, in memory.
    pub fn open_bytes(&self, sealed: &[u8], what: &str) -> Result<Vec<u8>, CryptError> {
        let mut out = Vec::with_capacity(sealed.len());
        self.open(sealed, what)?
            .read_to_end(&mut out)
            .map_err(|e| CryptError::Damaged { what: what.to_string(), message: format!("its encrypted data is damaged ({e})") })?;
        Ok(out)
    }
}

/// Without a key: the error a restore gives for an encrypted object.
pub fn needs_key(sealed_head: &[u8], what: &str) -> CryptError {
    CryptError::NoKey { what: what.to_string(), needed: header_recipients(sealed_head) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;
    use std::process::Command;

    /// A directory of its own under the temporary directory, removed when the test ends.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(label: &str) -> Scratch {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("omni-crypt-test-{label}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn keys_of(identity: &x25519::Identity, dir: &Path, name: &str) -> Keys {
        let path = dir.join(name);
        std::fs::write(&path, format!("# created: by the test\n# public key: {}\n{}\n", identity.to_public(), identity.to_string().expose_secret())).unwrap();
        Keys::load(&path, "OMNI_DECRYPT_IDENTITY_FILE").unwrap()
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7919 % 251) as u8).collect()
    }

    /// Debian's `age` CLI (.ci/run installs it).
    fn age_cli() -> &'static str {
        let found = Command::new("age").arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(found, "these tests read our objects with Debian's age CLI: apt-get install age");
        "age"
    }

    /// `identity` as an age identity file in `dir` (what `age -i` reads).
    fn identity_file(identity: &x25519::Identity, dir: &Path) -> PathBuf {
        let path = dir.join("key.txt");
        std::fs::write(&path, format!("{}\n", identity.to_string().expose_secret())).unwrap();
        path
    }

    /// What `age -d -i key_file file` prints; it must succeed.
    fn cli_decrypt(key_file: &Path, file: &Path) -> Vec<u8> {
        let run = Command::new(age_cli()).arg("-d").arg("-i").arg(key_file).arg(file).output().unwrap();
        assert!(run.status.success(), "age -d {}: {}", file.display(), String::from_utf8_lossy(&run.stderr));
        run.stdout
    }

    #[test]
    fn recipients_seal_and_only_their_identities_open_naming_the_keys_needed() {
        let dir = Scratch::new("keys");
        let (a, b, stranger) = (x25519::Identity::generate(), x25519::Identity::generate(), x25519::Identity::generate());
        let settings = EncryptSettings { recipients: Some(format!(" {} ,{}", a.to_public(), b.to_public())), ..Default::default() };
        let encryption = Encryption::from_settings(&settings).unwrap();
        let sealer = encryption.sealer().unwrap();
        let plain = bytes(200_000);
        let sealed = sealer.seal(&plain, "wal/000000010000000000000001.lz4").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(64).any(|w| w == &plain[1000..1064]), "the plain bytes are in the object");
        assert_eq!(header_recipients(&sealed), vec![a.to_public().to_string(), b.to_public().to_string()]);
        assert_eq!(sealer.recipients(), header_recipients(&sealed));

        for (identity, name) in [(&a, "a.txt"), (&b, "b.txt")] {
            let keys = keys_of(identity, &dir.0, name);
            assert_eq!(keys.open_bytes(&sealed, "the segment").unwrap(), plain);
        }
        let err = keys_of(&stranger, &dir.0, "stranger.txt").open_bytes(&sealed, "wal/000000010000000000000001.lz4").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CryptError::WrongKey { .. }), "{text}");
        assert!(text.contains("wal/000000010000000000000001.lz4"), "{text}");
        for needed in [a.to_public().to_string(), b.to_public().to_string(), stranger.to_public().to_string()] {
            assert!(text.contains(&short(&needed)), "{needed} is not named in: {text}");
        }
        assert!(!text.contains("AGE-SECRET-KEY"), "{text}");
    }

    #[test]
    fn a_passphrase_seals_and_opens_and_a_wrong_one_is_told_so() {
        let dir = Scratch::new("pass");
        let file = dir.0.join("passphrase");
        std::fs::write(&file, "correct horse battery staple and more words\n").unwrap();
        let encryption = Encryption::from_settings(&EncryptSettings { passphrase_file: Some(file.clone()), ..Default::default() }).unwrap();
        let sealed = encryption.sealer().unwrap().seal(b"a manifest", "base/x/manifest.json").unwrap();
        assert_eq!(header_recipients(&sealed), vec!["passphrase".to_string()]);
        assert_eq!(Keys::load(&file, "--identity").unwrap().open_bytes(&sealed, "m").unwrap(), b"a manifest");
        let wrong = dir.0.join("wrong");
        std::fs::write(&wrong, "another passphrase\n").unwrap();
        let err = Keys::load(&wrong, "--identity").unwrap().open_bytes(&sealed, "base/x/manifest.json").unwrap_err();
        assert!(matches!(err, CryptError::WrongKey { .. }), "{err}");
        // An X25519 identity does not open a passphrase object either.
        let err = keys_of(&x25519::Identity::generate(), &dir.0, "k.txt").open_bytes(&sealed, "m").unwrap_err();
        assert!(matches!(err, CryptError::WrongKey { .. }), "{err}");
    }

    #[test]
    fn debians_age_cli_decrypts_our_objects_byte_for_byte_and_we_read_its_files() {
        let cli = age_cli();
        let dir = Scratch::new("cli");
        let identity = x25519::Identity::generate();
        let key_file = identity_file(&identity, &dir.0);
        let recipients_file = dir.0.join("recipients.txt");
        std::fs::write(&recipients_file, format!("# the backup key\n{}\n\n", identity.to_public())).unwrap();
        let encryption = Encryption::from_settings(&EncryptSettings { recipients_file: Some(recipients_file), ..Default::default() }).unwrap();

        // 3 MB: several of age's 64 KiB chunks, streamed through a file.
        let plain = dir.0.join("base.tar.lz4");
        std::fs::write(&plain, bytes(3 << 20)).unwrap();
        let sealed = dir.0.join("base.tar.lz4.age");
        assert_eq!(encryption.sealer().unwrap().seal_file(&plain, &sealed).unwrap(), 3 << 20);
        assert!(cli_decrypt(&key_file, &sealed) == std::fs::read(&plain).unwrap(), "age -d gave other bytes");

        // And a file the CLI made (no omni-recipient stanza) opens with our keys.
        let from_cli = dir.0.join("from-cli.age");
        let run = Command::new(cli).arg("-r").arg(identity.to_public().to_string()).arg("-o").arg(&from_cli).arg(&plain).output().unwrap();
        assert!(run.status.success(), "age -r: {}", String::from_utf8_lossy(&run.stderr));
        let keys = Keys::load(&key_file, "OMNI_DECRYPT_IDENTITY_FILE").unwrap();
        let mut back = Vec::new();
        keys.open(std::fs::File::open(&from_cli).unwrap(), "from-cli.age").unwrap().read_to_end(&mut back).unwrap();
        assert!(back == std::fs::read(&plain).unwrap());
        assert!(header_recipients(&std::fs::read(&from_cli).unwrap()).is_empty());
    }

    /// AgeWriter at the payload's edges (empty, one byte, a chunk and a byte
    /// either side of it, two chunks, two and a byte), written in pieces
    /// that straddle chunks: the age crate and Debian's CLI both read back
    /// every byte, and the file is the size age's format gives it.
    #[test]
    fn ring_payload_opens_with_the_age_crate_and_the_cli() {
        let dir = Scratch::new("ring");
        let identity = x25519::Identity::generate();
        let key_file = identity_file(&identity, &dir.0);
        let keys = Keys::load(&key_file, "OMNI_DECRYPT_IDENTITY_FILE").unwrap();
        let sealer = Encryption::from_settings(&EncryptSettings { recipients: Some(identity.to_public().to_string()), ..Default::default() }).unwrap().sealer().unwrap();
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1] {
            let plain = bytes(size);
            let mut w = sealer.wrap(Vec::new()).unwrap();
            for piece in plain.chunks(7_777) {
                w.write_all(piece).unwrap();
            }
            let sealed = w.finish().unwrap();
            let header = header_len(&sealed).unwrap();
            let chunks = size.div_ceil(CHUNK).max(1);
            assert_eq!(sealed.len(), header + 16 + size + chunks * TAG, "size {size}");
            assert_eq!(keys.open_bytes(&sealed, "x").unwrap(), plain, "size {size}: the age crate read other bytes");
            let file = dir.0.join(format!("{size}.age"));
            std::fs::write(&file, &sealed).unwrap();
            assert!(cli_decrypt(&key_file, &file) == plain, "size {size}: age -d gave other bytes");
        }
        // A flipped byte in the middle chunk is refused, not skipped.
        let mut w = sealer.wrap(Vec::new()).unwrap();
        w.write_all(&bytes(3 * CHUNK)).unwrap();
        let mut sealed = w.finish().unwrap();
        let at = header_len(&sealed).unwrap() + 16 + (CHUNK + TAG) + 100;
        sealed[at] ^= 1;
        assert!(matches!(keys.open_bytes(&sealed, "x"), Err(CryptError::Damaged { .. })));
    }

    #[test]
    fn bad_settings_are_refused_naming_the_variable_and_never_fall_back_to_plain() {
        let dir = Scratch::new("bad");
        let identity = x25519::Identity::generate();
        let secret = identity.to_string().expose_secret().to_string();

        let err = Encryption::from_settings(&EncryptSettings { recipients: Some(secret.clone()), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("OMNI_ENCRYPT_RECIPIENTS") && err.contains("private key") && !err.contains(&secret), "{err}");

        let err = Encryption::from_settings(&EncryptSettings { recipients: Some("age1nope".into()), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("OMNI_ENCRYPT_RECIPIENTS") && err.contains("age1nope"), "{err}");

        let both = EncryptSettings { recipients: Some(identity.to_public().to_string()), passphrase_file: Some(dir.0.join("p")), ..Default::default() };
        let err = Encryption::from_settings(&both).unwrap_err().to_string();
        assert!(err.contains("OMNI_ENCRYPT_RECIPIENTS and OMNI_ENCRYPT_PASSPHRASE_FILE"), "{err}");

        let missing = EncryptSettings { recipients_file: Some(dir.0.join("absent.txt")), ..Default::default() };
        let err = Encryption::from_settings(&missing).unwrap_err().to_string();
        assert!(err.contains("OMNI_ENCRYPT_RECIPIENTS_FILE") && err.contains("absent.txt"), "{err}");

        let empty = dir.0.join("empty.txt");
        std::fs::write(&empty, "# nobody yet\n").unwrap();
        let err = Encryption::from_settings(&EncryptSettings { recipients_file: Some(empty), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("names no recipient"), "{err}");

        // A file good at start and emptied later: the next sealer is an error, not plain.
        let file = dir.0.join("recipients.txt");
        std::fs::write(&file, format!("{}\n", identity.to_public())).unwrap();
        let encryption = Encryption::from_settings(&EncryptSettings { recipients_file: Some(file.clone()), ..Default::default() }).unwrap();
        assert!(encryption.is_on());
        std::fs::remove_file(&file).unwrap();
        let err = encryption.sealer().unwrap_err().to_string();
        assert!(err.contains("nothing is uploaded"), "{err}");

        assert_eq!(Encryption::from_settings(&EncryptSettings::default()).unwrap(), Encryption::Off);
        assert!(Encryption::Off.sealer().unwrap().is_plain());
    }

    #[test]
    fn a_plain_object_where_encryption_is_expected_is_refused() {
        let dir = Scratch::new("plain");
        let keys = keys_of(&x25519::Identity::generate(), &dir.0, "k.txt");
        let err = keys.open_bytes(b"PGDMP plain dump", "logical/omni.dump").unwrap_err();
        assert!(matches!(err, CryptError::NotEncrypted { .. }), "{err}");
        let mut truncated = Encryption::from_settings(&EncryptSettings { recipients: Some(keys.public()[0].clone()), ..Default::default() })
            .unwrap()
            .sealer()
            .unwrap()
            .seal(&bytes(100_000), "x")
            .unwrap();
        truncated.truncate(truncated.len() - 100);
        let err = keys.open_bytes(&truncated, "wal/x.lz4").unwrap_err();
        assert!(matches!(err, CryptError::Damaged { .. }) && err.to_string().contains("wal/x.lz4"), "{err}");
    }
}
