//! The secret parts of the shared TLS store (the ACME account's key, each
//! certificate's private key) sealed before they reach PostgreSQL, so a
//! database dump or a read-only role does not hand out the site's key.
//!
//! * **Key.** ChaCha20-Poly1305 (ring, already the TLS provider here) with
//!   a key derived by HKDF-SHA256 from `OMNI_TLS_SECRET_FILE`: a secret only
//!   the gateways hold. Not `OMNI_API_KEY` — API clients know that one —
//!   and not anything in the database, which is what the seal guards
//!   against.
//! * **Bound to its row.** The associated data names what is sealed (the
//!   certificate's domains, the account's directory), so a sealed key
//!   copied onto another row does not open.
//! * **One random nonce per seal**, stored in front of the ciphertext:
//!   `nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)`.

use std::path::Path;

use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN},
    hkdf,
    rand::{SecureRandom, SystemRandom},
};

/// The variable naming the secret, for every message about it.
pub const SECRET_VAR: &str = "OMNI_TLS_SECRET_FILE";
/// Fewer bytes than this are refused: HKDF cannot add entropy a short secret lacks.
const MIN_SECRET_LEN: usize = 32;
/// Changing this (or the info) makes every stored secret unreadable: it names the format.
const SALT: &[u8] = b"omni-gateway tls store v1";

/// Seals and opens with the key derived from the gateways' secret.
pub struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// Reads the secret file: refused when missing, short, or readable by every account.
    pub fn from_file(path: &Path) -> Result<Sealer, String> {
        use std::os::unix::fs::PermissionsExt;
        let shown = format!("{SECRET_VAR}={}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: cannot read it ({e}); every gateway on this database needs the same secret file (make one with: head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE)"))?;
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(format!("{shown}: the secret is readable by every account on this machine (mode {:o}); chmod 600 it", mode & 0o777));
        }
        let secret = std::fs::read(path).map_err(|e| format!("{shown}: cannot read it ({e})"))?;
        let secret = secret.trim_ascii();
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!("{shown}: the secret is {} bytes, fewer than {MIN_SECRET_LEN}; make one with: head -c 32 /dev/urandom | base64 > FILE", secret.len()));
        }
        Ok(Sealer::from_secret(secret))
    }

    fn from_secret(secret: &[u8]) -> Sealer {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
        let okm = prk.expand(&[b"chacha20-poly1305 key"], &CHACHA20_POLY1305).expect("32 bytes is within HKDF-SHA256's limit");
        Sealer { key: LessSafeKey::new(UnboundKey::from(okm)), random: SystemRandom::new() }
    }

    /// `plain` sealed for the row named by `label`.
    pub fn seal(&self, label: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).expect("the system's random source");
        let mut sealed = plain.to_vec();
        self.key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(label.as_bytes()), &mut sealed).expect("a message far below ChaCha20-Poly1305's limit");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// The plain text, or an error saying the secret differs (or the row was altered).
    pub fn open(&self, label: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let refused = || format!("{label}: the sealed value in the database does not open with this gateway's {SECRET_VAR}; every gateway on one database needs the same secret file (or the row was altered)");
        if sealed.len() < NONCE_LEN {
            return Err(refused());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut body = body.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(label.as_bytes()), &mut body).map_err(|_| refused())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_the_same_secret_and_label() {
        let sealer = Sealer::from_secret(b"0123456789abcdef0123456789abcdef");
        let sealed = sealer.seal("key omni.example.com", b"-----BEGIN PRIVATE KEY-----");
        assert!(!sealed.windows(7).any(|w| w == b"PRIVATE"), "the plain text shows through");
        assert_eq!(sealer.open("key omni.example.com", &sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        // Two seals of the same text differ (a fresh nonce each).
        assert_ne!(sealed, sealer.seal("key omni.example.com", b"-----BEGIN PRIVATE KEY-----"));

        let err = sealer.open("key other.example.com", &sealed).unwrap_err();
        assert!(err.contains(SECRET_VAR), "{err}");
        let other = Sealer::from_secret(b"another secret of at least 32 bytes!");
        assert!(other.open("key omni.example.com", &sealed).unwrap_err().contains("same secret"));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(sealer.open("key omni.example.com", &altered).is_err());
        assert!(sealer.open("key omni.example.com", b"short").is_err());
    }

    #[test]
    fn the_secret_file_is_refused_when_short_or_readable_by_all_naming_the_variable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("omni-seal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "short\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Sealer::from_file(&file).unwrap_err();
        assert!(err.starts_with(SECRET_VAR) && err.contains("fewer than 32"), "{err}");
        std::fs::write(&file, "c2VjcmV0IHNlY3JldCBzZWNyZXQgc2VjcmV0IHNlY3JldA==\n").unwrap();
        Sealer::from_file(&file).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Sealer::from_file(&file).unwrap_err();
        assert!(err.starts_with(SECRET_VAR) && err.contains("chmod 600"), "{err}");
        let err = Sealer::from_file(&dir.join("absent")).unwrap_err();
        assert!(err.starts_with(SECRET_VAR) && err.contains("absent"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
