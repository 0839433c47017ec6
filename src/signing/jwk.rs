//! JWK members: reading them, checking that they describe a usable key of
//! the stated algorithm, and the public half the JWKS publishes.

use std::path::Path;

use aws_lc_rs::signature;
use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use super::{Algorithm, KeyError, SigningKey};

/// A defect in the contents of a JWK.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    #[error("not a JSON object ({0})")]
    NotJson(String),
    #[error("no \"kid\" member; every key needs a key ID for verifiers to select it")]
    MissingKid,
    #[error("no \"alg\" member; it chooses the signing algorithm")]
    MissingAlg,
    #[error("unsupported \"alg\" {0:?}; use RS256, ES256 or EdDSA")]
    UnsupportedAlg(String),
    #[error("\"use\" is {0:?}; a signing key must have \"use\":\"sig\" or none")]
    WrongUse(String),
    #[error("\"kty\" is {found:?} but alg {alg} needs {expected:?}")]
    WrongKty {
        alg: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("\"crv\" is {found:?} but alg {alg} needs {expected:?}")]
    WrongCurve {
        alg: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("public key only (no \"d\" member); a private key is needed to sign")]
    PublicOnly,
    #[error("missing member {0:?}")]
    MissingMember(&'static str),
    #[error("member {0:?} is not unpadded base64url")]
    BadBase64(&'static str),
    #[error("the members do not form a valid key pair: {0}")]
    InvalidKeyPair(&'static str),
    #[error("RSA public exponent \"e\" is not 65537 (\"AQAB\"); small exponents such as 3 are refused")]
    RsaExponent,
    #[error("kid {0:?} is used by two keys; every published key needs its own kid")]
    DuplicateKid(String),
}

/// The members of a JWK file we understand. Not `Debug`: it holds private
/// members.
#[derive(Deserialize, Serialize, Default)]
pub(crate) struct JwkMembers {
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    pub(crate) use_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) d: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) p: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) q: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dq: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) qi: Option<String>,
}

/// The public half of a signing key, as published in the JWKS. It has no
/// field for a private member, so none can leak through it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicJwk {
    #[serde(rename = "use", skip_serializing_if = "Option::is_none", default)]
    pub use_: Option<String>,
    pub kty: String,
    pub kid: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub crv: Option<String>,
    pub alg: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub e: Option<String>,
}

impl PublicJwk {
    /// The public members of `m`, whose header was checked to give `kid`
    /// and `alg`. Only public members are copied: this type has no field
    /// for any other.
    pub(crate) fn from_members(m: &JwkMembers, kid: String, alg: Algorithm) -> Self {
        Self {
            use_: m.use_.clone(),
            kty: alg.kty().into(),
            kid,
            crv: alg.crv().map(Into::into),
            alg: alg.as_str().into(),
            x: m.x.clone(),
            y: m.y.clone(),
            n: m.n.clone(),
            e: m.e.clone(),
        }
    }
}

/// A JWK Set, the body of `/.well-known/jwks.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<PublicJwk>,
}

/// The members every key must have right: `kid`, a supported `alg`, `use`
/// (if present) `sig`, and the `kty` and `crv` that go with the `alg`.
pub(crate) fn checked_header(m: &JwkMembers) -> Result<(String, Algorithm), JwkError> {
    let kid = m.kid.clone().filter(|k| !k.is_empty()).ok_or(JwkError::MissingKid)?;
    let alg = match m.alg.as_deref() {
        None | Some("") => return Err(JwkError::MissingAlg),
        Some("RS256") => Algorithm::Rs256,
        Some("ES256") => Algorithm::Es256,
        Some("EdDSA") => Algorithm::EdDsa,
        Some(other) => return Err(JwkError::UnsupportedAlg(truncate(other))),
    };
    if let Some(u) = m.use_.as_deref().filter(|u| *u != "sig") {
        return Err(JwkError::WrongUse(truncate(u)));
    }
    let kty = m.kty.as_deref().unwrap_or_default();
    if kty != alg.kty() {
        return Err(JwkError::WrongKty {
            alg: alg.as_str(),
            expected: alg.kty(),
            found: truncate(kty),
        });
    }
    if let Some(expected) = alg.crv() {
        let crv = m.crv.as_deref().unwrap_or_default();
        if crv != expected {
            return Err(JwkError::WrongCurve {
                alg: alg.as_str(),
                expected,
                found: truncate(crv),
            });
        }
    }
    Ok((kid, alg))
}

/// The keys a `--public-key-path` file holds: one JWK (private or public;
/// only the public part is used) or a JWK Set `{"keys":[...]}`, which may be
/// empty (nothing to publish right now).
pub fn load_public_keys(path: &Path) -> Result<Vec<PublicJwk>, KeyError> {
    let bytes = super::read_key_file(path).map_err(|error| KeyError::Read {
        path: path.to_owned(),
        error,
    })?;
    public_keys_from_json(&bytes).map_err(|error| KeyError::Invalid {
        path: path.to_owned(),
        error,
    })
}

/// Parses the text of a `--public-key-path` file (see [`load_public_keys`]).
pub fn public_keys_from_json(bytes: &[u8]) -> Result<Vec<PublicJwk>, JwkError> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<JwkMembers>,
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| JwkError::NotJson(crate::json::describe_error(&e)))?;
    let members: Vec<JwkMembers> = if value.get("keys").is_some() {
        serde_json::from_value::<Set>(value)
            .map_err(|e| JwkError::NotJson(crate::json::describe_error(&e)))?
            .keys
    } else {
        vec![serde_json::from_value(value).map_err(|e| JwkError::NotJson(crate::json::describe_error(&e)))?]
    };
    members.iter().map(public_from_members).collect()
}

/// Only the exponent every RSA signing key in practice has: small ones
/// (3) have a history of signature forgeries with careless verifiers, and
/// no key generator we accept keys from makes anything else.
pub(crate) fn check_rsa_exponent(e: &[u8]) -> Result<(), JwkError> {
    if e == [1, 0, 1] {
        Ok(())
    } else {
        Err(JwkError::RsaExponent)
    }
}

/// The public JWK of `m`, checked: with a private part, the pair must
/// match; without, the public members must form a usable key.
pub(crate) fn public_from_members(m: &JwkMembers) -> Result<PublicJwk, JwkError> {
    if m.d.is_some() {
        return SigningKey::from_members(m).map(|k| k.public_jwk().clone());
    }
    let (kid, alg) = checked_header(m)?;
    let invalid = |e: aws_lc_rs::error::KeyRejected| JwkError::InvalidKeyPair(e.description_());
    match alg {
        Algorithm::Rs256 => {
            let n = member(&m.n, "n")?;
            let e = member(&m.e, "e")?;
            // The limits aws-lc enforces when verifying: 2048 to 8192 bits,
            // no leading zero, an odd exponent.
            if n.len() < 256 || n.len() > 1024 || n[0] == 0 {
                return Err(JwkError::InvalidKeyPair("RSA modulus must be 2048 to 8192 bits"));
            }
            check_rsa_exponent(&e)?;
        }
        Algorithm::Es256 => {
            let mut point = vec![0x04];
            point.extend(member(&m.x, "x")?);
            point.extend(member(&m.y, "y")?);
            signature::ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point).map_err(invalid)?;
        }
        Algorithm::EdDsa => {
            let x = member(&m.x, "x")?;
            signature::ParsedPublicKey::new(&signature::ED25519, &x).map_err(invalid)?;
        }
    }
    Ok(PublicJwk::from_members(m, kid, alg))
}

/// The RFC 7638 SHA-256 thumbprint, as padded base64url: the `kid` that
/// jose-util assigns (44 characters ending in `=`).
pub(crate) fn thumbprint(m: &JwkMembers) -> String {
    // The required members of each key type, in lexicographic order, as
    // RFC 7638 section 3.2 prescribes.
    let canonical = match m.kty.as_deref() {
        Some("RSA") => serde_json::json!({"e": m.e, "kty": "RSA", "n": m.n}),
        Some("EC") => serde_json::json!({"crv": m.crv, "kty": "EC", "x": m.x, "y": m.y}),
        _ => serde_json::json!({"crv": m.crv, "kty": "OKP", "x": m.x}),
    };
    // serde_json's map is a BTreeMap (no preserve_order feature), so keys
    // come out sorted and without whitespace.
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.to_string().as_bytes());
    URL_SAFE.encode(digest.as_ref())
}

pub(crate) fn member(value: &Option<String>, name: &'static str) -> Result<Vec<u8>, JwkError> {
    let text = value.as_deref().ok_or(JwkError::MissingMember(name))?;
    URL_SAFE_NO_PAD.decode(text).map_err(|_| JwkError::BadBase64(name))
}

/// Values echoed in error messages are public members (`alg`, `kty`, ...),
/// but a hostile file could put anything there; keep messages short.
pub(crate) fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::test_keys::{generated as private, public_of};
    use super::*;

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // The RSA key of RFC 7638 section 3.1.
        let m = JwkMembers {
            kty: Some("RSA".into()),
            e: Some("AQAB".into()),
            n: Some("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".into()),
            ..JwkMembers::default()
        };
        let got = thumbprint(&m);
        assert_eq!(got, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs=");
    }

    #[test]
    fn public_key_files_hold_a_key_or_a_set() {
        let (_, a) = private(Algorithm::Es256);
        let (_, b) = private(Algorithm::Rs256);
        assert_eq!(public_keys_from_json(b"{\"keys\":[]}").unwrap(), vec![]);
        let set = json!({ "keys": [public_of(&a), b] });
        assert_eq!(public_keys_from_json(set.to_string().as_bytes()).unwrap().len(), 2);
        assert!(matches!(public_keys_from_json(b"nonsense"), Err(JwkError::NotJson(_))));
    }

    #[test]
    fn broken_public_keys_are_refused() {
        let (_, ec) = private(Algorithm::Es256);
        let (_, rsa) = private(Algorithm::Rs256);
        let (_, ed) = private(Algorithm::EdDsa);
        let load = |v: Value| public_keys_from_json(v.to_string().as_bytes());
        let mut off_curve = public_of(&ec);
        off_curve["y"] = ec["x"].clone();
        assert!(matches!(load(off_curve), Err(JwkError::InvalidKeyPair(_))));
        let mut short = public_of(&rsa);
        short["n"] = json!(URL_SAFE_NO_PAD.encode([0xffu8; 128]));
        assert!(matches!(load(short), Err(JwkError::InvalidKeyPair(_))));
        // Any exponent but 65537 is refused, by name, public or private.
        for e in ["AQAA", "Aw", "AQAAAQ", "AAEAAQ"] {
            let mut odd = public_of(&rsa);
            odd["e"] = json!(e);
            assert_eq!(load(odd).err(), Some(JwkError::RsaExponent), "{e}");
            let mut whole = rsa.clone();
            whole["e"] = json!(e);
            assert_eq!(
                SigningKey::from_jwk_json(whole.to_string().as_bytes()).err(),
                Some(JwkError::RsaExponent),
                "{e}"
            );
        }
        let mut short_ed = public_of(&ed);
        short_ed["x"] = json!("AAAA");
        assert!(matches!(load(short_ed), Err(JwkError::InvalidKeyPair(_))));
        let mut no_kid = public_of(&ed);
        no_kid.as_object_mut().unwrap().remove("kid");
        assert_eq!(load(no_kid).err(), Some(JwkError::MissingKid));
        // A private member that does not match is caught too.
        let mut mismatched = ed.clone();
        mismatched["x"] = public_of(&private(Algorithm::EdDsa).1)["x"].clone();
        assert!(matches!(load(mismatched), Err(JwkError::InvalidKeyPair(_))));
    }

    /// RSA moduli: exactly 2048 to 8192 bits, without a leading zero byte.
    #[test]
    fn rsa_modulus_sizes_at_the_limits() {
        let (_, rsa) = private(Algorithm::Rs256);
        let with_modulus = |n: Vec<u8>| {
            let mut key = public_of(&rsa);
            key["n"] = json!(URL_SAFE_NO_PAD.encode(n));
            public_keys_from_json(key.to_string().as_bytes())
        };
        let sized = |len: usize| {
            let mut n = vec![0xc5u8; len];
            n[len - 1] = 0x01;
            n
        };
        assert!(with_modulus(sized(256)).is_ok(), "2048 bits");
        assert!(with_modulus(sized(1024)).is_ok(), "8192 bits");
        for len in [255, 1025] {
            assert!(
                matches!(with_modulus(sized(len)), Err(JwkError::InvalidKeyPair(_))),
                "{len} bytes"
            );
        }
        let mut leading_zero = sized(300);
        leading_zero[0] = 0;
        assert!(matches!(with_modulus(leading_zero), Err(JwkError::InvalidKeyPair(_))));
    }

    /// RFC 7638's member sets for EC and OKP keys, written out by hand.
    #[test]
    fn thumbprints_of_ec_and_okp_keys() {
        let (_, ec) = private(Algorithm::Es256);
        let (_, ed) = private(Algorithm::EdDsa);
        let sha = |text: String| {
            URL_SAFE.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()).as_ref())
        };
        let members = |v: &Value| serde_json::from_value::<JwkMembers>(v.clone()).unwrap();
        let expected_ec = sha(format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            ec["x"].as_str().unwrap(),
            ec["y"].as_str().unwrap()
        ));
        assert_eq!(thumbprint(&members(&ec)), expected_ec);
        let expected_ed = sha(format!(
            r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
            ed["x"].as_str().unwrap()
        ));
        assert_eq!(thumbprint(&members(&ed)), expected_ed);
    }
}
