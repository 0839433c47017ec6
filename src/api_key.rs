//! API keys: parsing, generation, hashing and verification.
//!
//! # Design of the client-integration key format
//!
//! ```text
//! mlabk.cii_<integrationID>.ki_<keyID>.<keySecret>
//! ```
//!
//! The key names the exact record that validates it: the integration ID is the
//! parent (an `IntegrationMeta` entity or row) and the key ID the child. So
//! validation is a single point read by primary key, never a scan or a query,
//! and the store does not need an index on secrets.
//!
//! Only the SHA-256 of the secret is stored. A leaked database therefore gives
//! an attacker key IDs, not working keys; and because the secret is 256 random
//! bits, a fast unsalted hash is enough (no dictionary to attack).
//!
//! Trade-offs: the key is longer than a bare random token, and every request
//! parses it. Parsing is cheap and bounded (see the limits below), and it
//! rejects garbage before the store is touched.
//!
//! Autojoin keys are the older, flat format: 32 random bytes in base64url.
//! The Datastore layout keeps them in plain text, so they are looked up by
//! value (a query); our SQL backends store only their SHA-256.

use crate::ground::{fill_random, random_hex, sha256_hex};
use std::fmt;
use std::str::FromStr;

use aws_lc_rs::constant_time;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Every client-integration key starts with this, so a leaked key is easy
/// to recognise (secret scanners, logs) and to tell apart from autojoin keys.
pub const PREFIX: &str = "mlabk.";
/// Marks the integration ID part of the key.
pub const INTEGRATION_ID_PREFIX: &str = "cii_";
/// Marks the key ID part; unlike the integration prefix, it stays part of the
/// key ID (it is the Datastore entity name and the `key_id` claim).
pub const KEY_ID_PREFIX: &str = "ki_";

/// Longest integration ID, in bytes. IDs are chosen by people; 64 leaves room
/// for any readable name while keeping the whole key bounded.
pub const MAX_INTEGRATION_ID_LEN: usize = 64;
/// Longest key ID, in bytes, including its `ki_` prefix. Generated IDs are
/// 19 bytes (`ki_` + 16 hex); custom ones may be longer but stay readable.
pub const MAX_KEY_ID_LEN: usize = 64;
/// Longest secret, in bytes. Generated secrets are 43 bytes; 128 leaves room
/// for secrets of up to 96 random bytes in base64.
pub const MAX_SECRET_LEN: usize = 128;
/// Longest whole key, in bytes, checked before anything else so an oversized
/// input costs nothing. The parts add up to
/// `6 ("mlabk.") + 4 ("cii_") + 64 + 1 (".") + 64 + 1 (".") + 128 = 268`;
/// 300 leaves headroom without allowing anything large.
pub const MAX_API_KEY_LEN: usize = 300;

/// Random bytes in a new secret: 256 bits, beyond any brute-force search.
const SECRET_BYTES: usize = 32;
/// Random bytes in a new key ID: 64 bits, so IDs never collide in practice
/// within one integration (and a collision is refused by the store anyway).
const KEY_ID_BYTES: usize = 8;

/// Hex digits of an autojoin key's SHA-256 shown as its fingerprint: 48
/// bits, enough to tell an organization's keys apart, useless for finding
/// the key.
pub const FINGERPRINT_LEN: usize = 12;

/// Longest autojoin key we will look up. Generated keys are 43 bytes; the
/// bound only keeps absurd inputs away from the store.
pub const MAX_AUTOJOIN_KEY_LEN: usize = 300;

/// Every way a presented client-integration key can be malformed.
///
/// The HTTP layer maps all of them to the same 401; the variants exist for
/// tests and for the log line, which never includes the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("API key longer than {MAX_API_KEY_LEN} bytes")]
    TooLong,
    #[error("API key does not start with {PREFIX:?}")]
    MissingPrefix,
    #[error("API key has fewer than three parts after the prefix")]
    TooFewParts,
    #[error("API key has more than three parts after the prefix")]
    TooManyParts,
    #[error("integration part does not start with {INTEGRATION_ID_PREFIX:?}")]
    MissingIntegrationIdPrefix,
    #[error("integration ID is empty")]
    EmptyIntegrationId,
    #[error("integration ID longer than {MAX_INTEGRATION_ID_LEN} bytes")]
    IntegrationIdTooLong,
    #[error("key ID does not start with {KEY_ID_PREFIX:?}")]
    MissingKeyIdPrefix,
    #[error("key ID is empty")]
    EmptyKeyId,
    #[error("key ID longer than {MAX_KEY_ID_LEN} bytes")]
    KeyIdTooLong,
    #[error("key secret is empty")]
    EmptySecret,
    #[error("key secret longer than {MAX_SECRET_LEN} bytes")]
    SecretTooLong,
}

/// A key secret, or a whole API key that contains one. `Debug` and `Display`
/// never show it; [`Secret::expose`] is the one deliberate way out.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The plaintext, for the few places that must have it: hashing, and
    /// printing a newly created key once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Lowercase hex SHA-256 of the plaintext: what the stores keep.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(self.0.as_bytes())
    }

    /// True when this secret hashes to `stored_hash` (lowercase hex).
    ///
    /// The comparison takes the same time wherever the two differ, so the
    /// response time does not reveal how much of a guess was right.
    pub fn matches_hash(&self, stored_hash: &str) -> bool {
        let computed = self.sha256_hex();
        constant_time::verify_slices_are_equal(computed.as_bytes(), stored_hash.as_bytes()).is_ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A well-formed client-integration API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrationApiKey {
    integration_id: String,
    key_id: String,
    secret: Secret,
}

impl IntegrationApiKey {
    /// A new key with a random secret, and a random key ID unless one is given.
    pub fn generate(integration_id: &str, key_id: Option<&str>) -> Self {
        let key_id = match key_id {
            Some(id) => id.to_owned(),
            None => new_key_id(),
        };
        Self {
            integration_id: integration_id.to_owned(),
            key_id,
            secret: Secret(random_base64url(SECRET_BYTES)),
        }
    }

    /// The integration ID, without its `cii_` prefix.
    pub fn integration_id(&self) -> &str {
        &self.integration_id
    }

    /// The key ID, with its `ki_` prefix.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The full key as the customer uses it. Only for showing a new key once.
    pub fn to_secret_string(&self) -> Secret {
        Secret(format!(
            "{PREFIX}{INTEGRATION_ID_PREFIX}{}.{}.{}",
            self.integration_id,
            self.key_id,
            self.secret.expose()
        ))
    }
}

impl FromStr for IntegrationApiKey {
    type Err = ParseError;

    fn from_str(key: &str) -> Result<Self, ParseError> {
        if key.len() > MAX_API_KEY_LEN {
            return Err(ParseError::TooLong);
        }
        let rest = key.strip_prefix(PREFIX).ok_or(ParseError::MissingPrefix)?;
        // At most four pieces: a fourth means an extra dot, and splitting
        // stops there instead of walking every dot of a hostile input.
        let mut parts = rest.splitn(4, '.');
        let (Some(integration), Some(key_id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ParseError::TooFewParts);
        };
        if parts.next().is_some() {
            return Err(ParseError::TooManyParts);
        }

        let integration_id = integration
            .strip_prefix(INTEGRATION_ID_PREFIX)
            .ok_or(ParseError::MissingIntegrationIdPrefix)?;
        if integration_id.is_empty() {
            return Err(ParseError::EmptyIntegrationId);
        }
        if integration_id.len() > MAX_INTEGRATION_ID_LEN {
            return Err(ParseError::IntegrationIdTooLong);
        }

        let key_id_suffix = key_id
            .strip_prefix(KEY_ID_PREFIX)
            .ok_or(ParseError::MissingKeyIdPrefix)?;
        if key_id_suffix.is_empty() {
            return Err(ParseError::EmptyKeyId);
        }
        if key_id.len() > MAX_KEY_ID_LEN {
            return Err(ParseError::KeyIdTooLong);
        }

        if secret.is_empty() {
            return Err(ParseError::EmptySecret);
        }
        if secret.len() > MAX_SECRET_LEN {
            return Err(ParseError::SecretTooLong);
        }

        Ok(Self {
            integration_id: integration_id.to_owned(),
            key_id: key_id.to_owned(),
            secret: Secret(secret.to_owned()),
        })
    }
}

/// Why a presented autojoin key was refused before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AutojoinKeyError {
    #[error("autojoin key is empty")]
    Empty,
    #[error("autojoin key longer than {MAX_AUTOJOIN_KEY_LEN} bytes")]
    TooLong,
}

/// An autojoin (organization) API key. The format is opaque: keys written by
/// other tools are accepted as long as they are non-empty and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutojoinApiKey(Secret);

impl AutojoinApiKey {
    /// A new key: 32 random bytes in unpadded base64url, like M-Lab's tools make.
    pub fn generate() -> Self {
        Self(Secret(random_base64url(SECRET_BYTES)))
    }

    pub fn secret(&self) -> &Secret {
        &self.0
    }

    /// A short, non-reversible name for the key, safe to show and to log.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_hash(&self.0.sha256_hex())
    }
}

impl FromStr for AutojoinApiKey {
    type Err = AutojoinKeyError;

    fn from_str(key: &str) -> Result<Self, AutojoinKeyError> {
        if key.is_empty() {
            return Err(AutojoinKeyError::Empty);
        }
        if key.len() > MAX_AUTOJOIN_KEY_LEN {
            return Err(AutojoinKeyError::TooLong);
        }
        Ok(Self(Secret(key.to_owned())))
    }
}

/// The fingerprint of an autojoin key, given the hex SHA-256 of the key:
/// its first [`FINGERPRINT_LEN`] digits.
pub fn fingerprint_of_hash(sha256_hex: &str) -> String {
    sha256_hex.chars().take(FINGERPRINT_LEN).collect()
}

/// A new key ID: `ki_` and 16 lowercase hex characters.
pub fn new_key_id() -> String {
    format!("{KEY_ID_PREFIX}{}", random_hex(KEY_ID_BYTES))
}

/// Checks an integration ID or key ID chosen by an operator. Stricter than
/// the parser (which must accept whatever IDs already exist): new IDs use
/// only characters that survive URLs, shells and Datastore key names.
pub fn check_new_id(id: &str, max_len: usize) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > max_len {
        return Err(format!("must be at most {max_len} bytes"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err("may contain only ASCII letters, digits, '_' and '-'".into());
    }
    Ok(())
}

fn random_base64url(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    fill_random(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(int: &str, ki: &str, secret: &str) -> String {
        format!("mlabk.cii_{int}.{ki}.{secret}")
    }

    #[test]
    fn parses_a_generated_key() {
        let generated = IntegrationApiKey::generate("acme", None);
        let text = generated.to_secret_string();
        let parsed: IntegrationApiKey = text.expose().parse().unwrap();
        assert_eq!(parsed, generated);
        assert_eq!(parsed.integration_id(), "acme");
        assert!(parsed.key_id().starts_with("ki_"));
        assert_eq!(parsed.key_id().len(), 19);
        assert!(
            parsed.key_id()[3..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(parsed.secret().expose().len(), 43);
    }

    #[test]
    fn boundaries_and_defects() {
        let id64 = "i".repeat(64);
        let id65 = "i".repeat(65);
        let ki64 = format!("ki_{}", "k".repeat(61));
        let ki65 = format!("ki_{}", "k".repeat(62));
        let s128 = "s".repeat(128);
        let s129 = "s".repeat(129);
        // A key of exactly 300 bytes whose parts are within their limits
        // would need 300 - 6 - 4 - 2 = 288 bytes of parts, more than the part
        // limits allow (64 + 64 + 128 = 256), so the 300-byte boundary is
        // checked with oversized parts: 300 bytes reaches the part checks,
        // 301 is refused before them.
        let pad = |n: usize| {
            let base = key("a", "ki_b", "");
            format!("{base}{}", "s".repeat(n - base.len()))
        };
        let cases: Vec<(String, Result<(), ParseError>)> = vec![
            (key("a", "ki_b", "c"), Ok(())),
            (key(&id64, "ki_b", "c"), Ok(())),
            (key(&id65, "ki_b", "c"), Err(ParseError::IntegrationIdTooLong)),
            (key("a", &ki64, "c"), Ok(())),
            (key("a", &ki65, "c"), Err(ParseError::KeyIdTooLong)),
            (key("a", "ki_b", &s128), Ok(())),
            (key("a", "ki_b", &s129), Err(ParseError::SecretTooLong)),
            (key(&id64, &ki64, &s128), Ok(())),
            (pad(300), Err(ParseError::SecretTooLong)),
            (pad(301), Err(ParseError::TooLong)),
            (String::new(), Err(ParseError::MissingPrefix)),
            ("mlabk".into(), Err(ParseError::MissingPrefix)),
            ("MLABK.cii_a.ki_b.c".into(), Err(ParseError::MissingPrefix)),
            ("cii_a.ki_b.c".into(), Err(ParseError::MissingPrefix)),
            ("mlabk.".into(), Err(ParseError::TooFewParts)),
            ("mlabk.cii_a.ki_b".into(), Err(ParseError::TooFewParts)),
            ("mlabk.cii_a".into(), Err(ParseError::TooFewParts)),
            ("mlabk.cii_a.ki_b.c.d".into(), Err(ParseError::TooManyParts)),
            ("mlabk.cii_a.ki_b.c.".into(), Err(ParseError::TooManyParts)),
            ("mlabk....".into(), Err(ParseError::TooManyParts)),
            ("mlabk.a.ki_b.c".into(), Err(ParseError::MissingIntegrationIdPrefix)),
            ("mlabk.ci_a.ki_b.c".into(), Err(ParseError::MissingIntegrationIdPrefix)),
            ("mlabk.cii_.ki_b.c".into(), Err(ParseError::EmptyIntegrationId)),
            ("mlabk.cii_a.b.c".into(), Err(ParseError::MissingKeyIdPrefix)),
            ("mlabk.cii_a.ki_.c".into(), Err(ParseError::EmptyKeyId)),
            ("mlabk.cii_a.ki_b.".into(), Err(ParseError::EmptySecret)),
            ("mlabk..ki_b.c".into(), Err(ParseError::MissingIntegrationIdPrefix)),
            ("mlabk.cii_a..c".into(), Err(ParseError::MissingKeyIdPrefix)),
        ];
        for (input, want) in cases {
            let got = input.parse::<IntegrationApiKey>().map(|_| ());
            assert_eq!(got, want, "input {input:?} ({} bytes)", input.len());
        }
    }

    #[test]
    fn many_dots_fail_fast_as_too_many_parts() {
        let input = format!("mlabk.{}", ".".repeat(290));
        assert_eq!(input.parse::<IntegrationApiKey>(), Err(ParseError::TooManyParts));
    }

    #[test]
    fn parts_are_split_out() {
        let k: IntegrationApiKey = "mlabk.cii_acme-co.ki_0123.s3cr3t".parse().unwrap();
        assert_eq!(k.integration_id(), "acme-co");
        assert_eq!(k.key_id(), "ki_0123");
        assert_eq!(k.secret().expose(), "s3cr3t");
    }

    #[test]
    fn hash_is_lowercase_hex_sha256_and_compare_is_exact() {
        let s = Secret::new("abc".into());
        // SHA-256("abc") from FIPS 180-2, appendix B.1.
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(s.sha256_hex(), want);
        assert!(s.matches_hash(want));
        assert!(!s.matches_hash(&want.to_uppercase()));
        assert!(!s.matches_hash(&want[..63]));
        assert!(!s.matches_hash(""));
        assert!(!Secret::new("abd".into()).matches_hash(want));
    }

    #[test]
    fn secrets_never_print() {
        let k: IntegrationApiKey = "mlabk.cii_a.ki_b.topsecretvalue".parse().unwrap();
        assert!(!format!("{k:?}").contains("topsecretvalue"));
        assert!(!format!("{}", k.secret()).contains("topsecretvalue"));
        let a: AutojoinApiKey = "plainautojoinkey".parse().unwrap();
        assert!(!format!("{a:?}").contains("plainautojoinkey"));
        // In their place a marker, so a log shows that a secret was there.
        assert_eq!(format!("{:?}", k.secret()), "Secret(<redacted>)");
        assert_eq!(k.secret().to_string(), "<redacted>");
        assert_eq!(format!("{a:?}"), "AutojoinApiKey(Secret(<redacted>))");
    }

    #[test]
    fn autojoin_keys() {
        let k = AutojoinApiKey::generate();
        assert_eq!(k.secret().expose().len(), 43);
        assert!(
            k.secret()
                .expose()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(k, AutojoinApiKey::generate());
        assert_eq!(k.fingerprint().len(), 12);
        assert_eq!("".parse::<AutojoinApiKey>(), Err(AutojoinKeyError::Empty));
        assert!("x".repeat(300).parse::<AutojoinApiKey>().is_ok());
        assert_eq!(
            "x".repeat(301).parse::<AutojoinApiKey>(),
            Err(AutojoinKeyError::TooLong)
        );
    }

    #[test]
    fn new_ids_are_checked() {
        assert!(check_new_id("acme_co-1", 64).is_ok());
        assert!(check_new_id("", 64).is_err());
        assert!(check_new_id(&"a".repeat(64), 64).is_ok());
        assert!(check_new_id(&"a".repeat(65), 64).is_err());
        assert!(check_new_id("a.b", 64).is_err());
        assert!(check_new_id("a b", 64).is_err());
    }
}
