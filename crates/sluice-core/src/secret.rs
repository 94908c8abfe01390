//! Where secrets come from and how presented keys are hashed.
//!
//! sluice never keeps a client API key in plain text after startup: keys are
//! reduced to their SHA-256 digest and compared digest-to-digest (the
//! comparison itself is done in constant time by the gateway).

use sha2::{Digest, Sha256};

/// The SHA-256 digest of a key, as raw bytes.
pub type KeyDigest = [u8; 32];

/// Hashes a presented key.
pub fn digest(key: &str) -> KeyDigest {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.finalize().into()
}

/// Hex-encodes a digest (what `sha256 = "..."` in the config holds).
pub fn digest_hex(key: &str) -> String {
    hex::encode(digest(key))
}

/// Parses a 64-hex-digit SHA-256 digest.
pub fn parse_digest_hex(s: &str) -> Option<KeyDigest> {
    let bytes = hex::decode(s.trim()).ok()?;
    bytes.try_into().ok()
}

/// Where a secret value is read from when the gateway starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable by name.
    Env(String),
    /// A file whose contents (trimmed) are the secret.
    File(String),
}

impl SecretSource {
    /// Human description used in error messages.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Env(v) => format!("environment variable {v}"),
            SecretSource::File(p) => format!("file {p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_through_hex() {
        let hex = digest_hex("sk-test");
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_digest_hex(&hex), Some(digest("sk-test")));
        assert_eq!(parse_digest_hex("abc"), None);
        assert_eq!(parse_digest_hex(&"zz".repeat(32)), None);
    }
}
