//! Signing keys: loading private JWKs, signing JWTs, publishing the JWKS,
//! and generating new keys.
//!
//! Key files use the layout go-jose's `jose-util generate-key` writes, so keys
//! already deployed for the Go service load unchanged. All cryptography is
//! aws-lc-rs; this module only moves bytes between JWK members and its key
//! constructors, which check that the private and public parts agree.
//!
//! Each part has its own file: [`jwk`] reads and checks JWK members,
//! `der` reads the integers aws-lc exports for RSA, [`key`] holds a signing
//! key and signs, [`key_set`] is what the JWKS publishes, and `generate`
//! makes new keys and writes key files.

mod der;
mod generate;
pub mod jwk;
pub mod key;
pub mod key_set;

use std::path::PathBuf;

pub use generate::{GenerateError, write_private_jwk};
pub use jwk::{JwkError, Jwks, PublicJwk, load_public_keys, public_keys_from_json};
pub use key::{SignError, SigningKey};
pub use key_set::{KeySet, SharedKeys};

/// The JWS algorithms we sign with. RS256 is what Cloud Endpoints verifies in
/// production; ES256 and EdDSA are faster and accepted by other verifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    pub(crate) fn kty(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RSA",
            Algorithm::Es256 => "EC",
            Algorithm::EdDsa => "OKP",
        }
    }

    pub(crate) fn crv(self) -> Option<&'static str> {
        match self {
            Algorithm::Rs256 => None,
            Algorithm::Es256 => Some("P-256"),
            Algorithm::EdDsa => Some("Ed25519"),
        }
    }
}

/// Why a key file could not be used. Messages name the defect, never a
/// value of a private member.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    // The cause is in the message and deliberately not a `source`: error
    // chains (`{:#}`) would print it twice.
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {error}")]
    Invalid { path: PathBuf, error: JwkError },
}

/// Largest key file read: a JWK Set of a few RSA keys is a few KiB.
const MAX_KEY_FILE: u64 = 1 << 20;

/// Reads a key file. Opened without blocking and accepted only as a regular
/// file: a FIFO or a device at the path would block the open or the read
/// for as long as nobody writes to it.
pub fn read_key_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // O_NONBLOCK (Linux): an open of a FIFO with no writer returns at once.
    const NONBLOCK: i32 = 0o4000;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if metadata.len() > MAX_KEY_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_KEY_FILE} bytes"),
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    file.take(MAX_KEY_FILE + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Keys and key files for the tests of every part.
#[cfg(test)]
mod test_keys {
    use serde_json::Value;

    use super::{Algorithm, JwkError, SigningKey};

    /// A fresh key and its private JWK file, as JSON.
    pub(super) fn generated(alg: Algorithm) -> (SigningKey, Value) {
        let (key, text) = SigningKey::generate(alg, None).unwrap();
        (key, serde_json::from_str(&text).unwrap())
    }

    pub(super) fn load(v: &Value) -> Result<SigningKey, JwkError> {
        SigningKey::from_jwk_json(v.to_string().as_bytes())
    }

    /// A key file with its private members removed.
    pub(super) fn public_of(file: &Value) -> Value {
        let mut v = file.clone();
        for m in ["d", "p", "q", "dp", "dq", "qi"] {
            v.as_object_mut().unwrap().remove(m);
        }
        v
    }
}
