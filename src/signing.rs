//! Signing keys: loading private JWKs, signing JWTs, publishing the JWKS,
//! and generating new keys.
//!
//! Key files use the layout go-jose's `jose-util generate-key` writes, so keys
//! already deployed for the Go service load unchanged. All cryptography is
//! aws-lc-rs; this module only moves bytes between JWK members and its key
//! constructors, which check that the private and public parts agree.

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::encoding::{AsBigEndian, AsDer};
use aws_lc_rs::rsa::{KeyPairComponents, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

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

    fn kty(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RSA",
            Algorithm::Es256 => "EC",
            Algorithm::EdDsa => "OKP",
        }
    }

    fn crv(self) -> Option<&'static str> {
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
struct JwkMembers {
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    use_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    d: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    q: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dq: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qi: Option<String>,
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
    fn from_members(m: &JwkMembers, kid: String, alg: Algorithm) -> Self {
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

enum KeyMaterial {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// A loaded private key, ready to sign. `Debug` shows only public facts.
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    material: KeyMaterial,
    public: PublicJwk,
    /// The encoded JWS header, identical for every token this key signs.
    header_b64: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Signing failed inside aws-lc. Not expected with a valid key; answered 500.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("could not encode the claims: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the signature operation failed")]
    Crypto,
}

impl SigningKey {
    /// Loads a private JWK file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|error| KeyError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_jwk_json(&bytes).map_err(|error| KeyError::Invalid {
            path: path.to_owned(),
            error,
        })
    }

    /// Builds a key from the text of a private JWK.
    pub fn from_jwk_json(bytes: &[u8]) -> Result<Self, JwkError> {
        // Only the kind of error and its position: serde_json's own message
        // would quote the value, which may be private key material.
        let members: JwkMembers =
            serde_json::from_slice(bytes).map_err(|e| JwkError::NotJson(crate::json::describe_error(&e)))?;
        Self::from_members(&members)
    }

    fn from_members(m: &JwkMembers) -> Result<Self, JwkError> {
        let (kid, alg) = checked_header(m)?;
        if m.d.is_none() {
            return Err(JwkError::PublicOnly);
        }

        let public = PublicJwk::from_members(m, kid.clone(), alg);
        Self::with_material(m, kid, alg, public)
    }

    fn with_material(m: &JwkMembers, kid: String, alg: Algorithm, public: PublicJwk) -> Result<Self, JwkError> {
        let material = match alg {
            Algorithm::Rs256 => {
                let e = member(&m.e, "e")?;
                check_rsa_exponent(&e)?;
                let components = KeyPairComponents {
                    public_key: PublicKeyComponents {
                        n: member(&m.n, "n")?,
                        e,
                    },
                    d: member(&m.d, "d")?,
                    p: member(&m.p, "p")?,
                    q: member(&m.q, "q")?,
                    dP: member(&m.dp, "dp")?,
                    dQ: member(&m.dq, "dq")?,
                    qInv: member(&m.qi, "qi")?,
                };
                let pair =
                    RsaKeyPair::from_components(&components).map_err(|e| JwkError::InvalidKeyPair(e.description_()))?;
                KeyMaterial::Rsa(pair)
            }
            Algorithm::Es256 => {
                let x = member(&m.x, "x")?;
                let y = member(&m.y, "y")?;
                let d = member(&m.d, "d")?;
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                let pair = EcdsaKeyPair::from_private_key_and_public_key(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &d,
                    &point,
                )
                .map_err(|e| JwkError::InvalidKeyPair(e.description_()))?;
                KeyMaterial::Ec(pair)
            }
            Algorithm::EdDsa => {
                let x = member(&m.x, "x")?;
                let d = member(&m.d, "d")?;
                let pair = Ed25519KeyPair::from_seed_and_public_key(&d, &x)
                    .map_err(|e| JwkError::InvalidKeyPair(e.description_()))?;
                KeyMaterial::Ed(pair)
            }
        };

        let header = serde_json::json!({ "alg": alg.as_str(), "kid": kid });
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        Ok(Self {
            alg,
            kid,
            material,
            public,
            header_b64,
        })
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK, as the JWKS publishes it.
    pub fn public_jwk(&self) -> &PublicJwk {
        &self.public
    }

    /// Signs `claims` into a compact JWS: `header.payload.signature`.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, SignError> {
        let payload = serde_json::to_vec(claims)?;
        let mut token = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 400);
        token.push_str(&self.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let signature = self.sign_bytes(token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
        Ok(token)
    }

    fn sign_bytes(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match &self.material {
            KeyMaterial::Rsa(pair) => {
                let mut sig = vec![0u8; pair.public_modulus_len()];
                let rng = aws_lc_rs::rand::SystemRandom::new();
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .map_err(|_| SignError::Crypto)?;
                Ok(sig)
            }
            KeyMaterial::Ec(pair) => {
                let rng = aws_lc_rs::rand::SystemRandom::new();
                let sig = pair.sign(&rng, message).map_err(|_| SignError::Crypto)?;
                Ok(sig.as_ref().to_vec())
            }
            KeyMaterial::Ed(pair) => Ok(pair.sign(message).as_ref().to_vec()),
        }
    }

    /// Generates a new key. Returns it with the text of its private JWK file
    /// (jose-util layout). The `kid` defaults to the RFC 7638 thumbprint.
    pub fn generate(alg: Algorithm, kid: Option<String>) -> Result<(Self, String), GenerateError> {
        let mut m = JwkMembers {
            use_: Some("sig".into()),
            kty: Some(alg.kty().into()),
            crv: alg.crv().map(Into::into),
            alg: Some(alg.as_str().into()),
            ..JwkMembers::default()
        };
        let b64 = |bytes: &[u8]| Some(URL_SAFE_NO_PAD.encode(bytes));
        match alg {
            Algorithm::Rs256 => {
                let pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| GenerateError)?;
                let pkcs8 = pair.as_der().map_err(|_| GenerateError)?;
                let ints = der::rsa_private_key_from_pkcs8(pkcs8.as_ref()).ok_or(GenerateError)?;
                [m.n, m.e, m.d, m.p, m.q, m.dp, m.dq, m.qi] = ints.map(b64);
            }
            Algorithm::Es256 => {
                let pair =
                    EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).map_err(|_| GenerateError)?;
                let d = pair.private_key().as_be_bytes().map_err(|_| GenerateError)?;
                let point = pair.public_key().as_ref();
                // Uncompressed SEC1 point: 0x04, then x and y (32 bytes each).
                m.x = b64(&point[1..33]);
                m.y = b64(&point[33..65]);
                m.d = b64(d.as_ref());
            }
            Algorithm::EdDsa => {
                let pair = Ed25519KeyPair::generate().map_err(|_| GenerateError)?;
                let seed = pair.seed().map_err(|_| GenerateError)?;
                let seed = seed.as_be_bytes().map_err(|_| GenerateError)?;
                m.x = b64(pair.public_key().as_ref());
                m.d = b64(seed.as_ref());
            }
        }
        m.kid = Some(match kid {
            Some(k) => k,
            None => thumbprint(&m),
        });
        // Unwrap: serialising a struct of strings cannot fail.
        let text = serde_json::to_string(&m).expect("JWK members serialise");
        let key = Self::from_members(&m).map_err(|_| GenerateError)?;
        Ok((key, text))
    }
}

/// The members every key must have right: `kid`, a supported `alg`, `use`
/// (if present) `sig`, and the `kty` and `crv` that go with the `alg`.
fn checked_header(m: &JwkMembers) -> Result<(String, Algorithm), JwkError> {
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

/// The keys the service works with: the one that signs, and every key the
/// JWKS publishes (the active one first, then keys being introduced or
/// retired), serialised once rather than per request.
#[derive(Debug)]
pub struct KeySet {
    active: SigningKey,
    published: Vec<PublicJwk>,
    jwks_json: String,
}

impl KeySet {
    /// A set that publishes only the active key.
    pub fn new(active: SigningKey) -> Self {
        // Unwrap: one key cannot repeat a kid.
        Self::with_published(active, Vec::new()).expect("a single key has a unique kid")
    }

    /// A set that also publishes `others`, which never sign. Every `kid`
    /// must be distinct: a verifier picks the key by `kid`, and two keys
    /// under one `kid` would make it pick wrong.
    pub fn with_published(active: SigningKey, others: Vec<PublicJwk>) -> Result<Self, JwkError> {
        let mut published = vec![active.public_jwk().clone()];
        for key in others {
            if published.iter().any(|p| p.kid == key.kid) {
                return Err(JwkError::DuplicateKid(truncate(&key.kid)));
            }
            published.push(key);
        }
        let jwks = Jwks { keys: published };
        // Go's json.Encoder ends the document with a newline; keep it.
        let jwks_json = serde_json::to_string(&jwks).expect("a JWKS of strings serialises") + "\n";
        Ok(Self {
            active,
            published: jwks.keys,
            jwks_json,
        })
    }

    /// Loads the active private key and the files of keys to publish.
    pub fn load(private_path: &Path, public_paths: &[PathBuf]) -> Result<Self, KeyError> {
        let active = SigningKey::load(private_path)?;
        let mut others: Vec<PublicJwk> = Vec::new();
        for path in public_paths {
            let keys = load_public_keys(path)?;
            // Checked file by file, so the error names the file that
            // repeats a kid, not the first one given.
            for key in &keys {
                if key.kid == active.kid() || others.iter().any(|o| o.kid == key.kid) {
                    return Err(KeyError::Invalid {
                        path: path.clone(),
                        error: JwkError::DuplicateKid(truncate(&key.kid)),
                    });
                }
            }
            others.extend(keys);
        }
        Self::with_published(active, others).map_err(|error| KeyError::Invalid {
            path: private_path.to_owned(),
            error,
        })
    }

    /// The key new tokens are signed with.
    pub fn active(&self) -> &SigningKey {
        &self.active
    }

    /// The `kid` of every published key, the active one first.
    pub fn kids(&self) -> Vec<&str> {
        self.published.iter().map(|k| k.kid.as_str()).collect()
    }

    /// The body of `/.well-known/jwks.json`.
    pub fn jwks_json(&self) -> &str {
        &self.jwks_json
    }
}

/// The key set in use, replaced atomically on reload.
pub type SharedKeys = std::sync::Arc<arc_swap::ArcSwap<KeySet>>;

/// The keys a `--public-key-path` file holds: one JWK (private or public;
/// only the public part is used) or a JWK Set `{"keys":[...]}`, which may be
/// empty (nothing to publish right now).
pub fn load_public_keys(path: &Path) -> Result<Vec<PublicJwk>, KeyError> {
    let bytes = std::fs::read(path).map_err(|error| KeyError::Read {
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
fn check_rsa_exponent(e: &[u8]) -> Result<(), JwkError> {
    if e == [1, 0, 1] {
        Ok(())
    } else {
        Err(JwkError::RsaExponent)
    }
}

/// The public JWK of `m`, checked: with a private part, the pair must
/// match; without, the public members must form a usable key.
fn public_from_members(m: &JwkMembers) -> Result<PublicJwk, JwkError> {
    if m.d.is_some() {
        return SigningKey::from_members(m).map(|k| k.public);
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

/// aws-lc could not generate a key; nothing to recover.
#[derive(Debug, thiserror::Error)]
#[error("key generation failed")]
pub struct GenerateError;

/// The RFC 7638 SHA-256 thumbprint, as padded base64url: the `kid` that
/// jose-util assigns (44 characters ending in `=`).
fn thumbprint(m: &JwkMembers) -> String {
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

/// Writes a new private key file readable only by its owner. Refuses to
/// replace an existing file: overwriting a signing key by accident would
/// invalidate every token it signed.
pub fn write_private_jwk(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

fn member(value: &Option<String>, name: &'static str) -> Result<Vec<u8>, JwkError> {
    let text = value.as_deref().ok_or(JwkError::MissingMember(name))?;
    URL_SAFE_NO_PAD.decode(text).map_err(|_| JwkError::BadBase64(name))
}

/// Values echoed in error messages are public members (`alg`, `kty`, ...),
/// but a hostile file could put anything there; keep messages short.
fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// Just enough DER to read the integers of a PKCS#8-wrapped RSAPrivateKey,
/// which is how aws-lc exports a generated RSA key.
mod der {
    /// Reads one TLV with the expected tag; returns its contents and the rest.
    fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = input.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (bytes, r) = rest.split_at(n);
            rest = r;
            bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        if rest.len() < len {
            return None;
        }
        Some(rest.split_at(len))
    }

    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const OCTET_STRING: u8 = 0x04;

    /// `[n, e, d, p, q, dp, dq, qi]`, big-endian without leading zeros.
    pub(super) fn rsa_private_key_from_pkcs8(pkcs8: &[u8]) -> Option<[&[u8]; 8]> {
        // PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING }
        let (info, _) = tlv(pkcs8, SEQUENCE)?;
        let (_, rest) = tlv(info, INTEGER)?;
        let (_, rest) = tlv(rest, SEQUENCE)?;
        let (private_key, _) = tlv(rest, OCTET_STRING)?;
        // RSAPrivateKey ::= SEQUENCE { version, n, e, d, p, q, dp, dq, qi }
        let (mut fields, _) = tlv(private_key, SEQUENCE)?;
        let (_, rest) = tlv(fields, INTEGER)?;
        fields = rest;
        let mut out: [&[u8]; 8] = [&[]; 8];
        for slot in &mut out {
            let (int, rest) = tlv(fields, INTEGER)?;
            let start = int.iter().position(|b| *b != 0).unwrap_or(int.len());
            *slot = &int[start..];
            fields = rest;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn generated(alg: Algorithm) -> (SigningKey, Value) {
        let (key, text) = SigningKey::generate(alg, None).unwrap();
        (key, serde_json::from_str(&text).unwrap())
    }

    fn load(v: &Value) -> Result<SigningKey, JwkError> {
        SigningKey::from_jwk_json(v.to_string().as_bytes())
    }

    #[test]
    fn generated_keys_round_trip_in_the_jose_util_layout() {
        for alg in [Algorithm::Rs256, Algorithm::Es256, Algorithm::EdDsa] {
            let (key, file) = generated(alg);
            let members: Vec<&str> = file.as_object().unwrap().keys().map(String::as_str).collect();
            let want: &[&str] = match alg {
                Algorithm::Rs256 => &["alg", "d", "dp", "dq", "e", "kid", "kty", "n", "p", "q", "qi", "use"],
                Algorithm::Es256 => &["alg", "crv", "d", "kid", "kty", "use", "x", "y"],
                Algorithm::EdDsa => &["alg", "crv", "d", "kid", "kty", "use", "x"],
            };
            assert_eq!(members, want, "{alg:?}");
            let kid = file["kid"].as_str().unwrap();
            assert_eq!(kid.len(), 44, "{alg:?}");
            assert!(kid.ends_with('='));
            let reloaded = load(&file).unwrap();
            assert_eq!(reloaded.public_jwk(), key.public_jwk());
            assert_eq!(reloaded.kid(), kid);
        }
    }

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
    fn public_jwk_has_no_private_member() {
        for alg in [Algorithm::Rs256, Algorithm::Es256, Algorithm::EdDsa] {
            let (key, _) = generated(alg);
            let public = serde_json::to_value(key.public_jwk()).unwrap();
            for private in ["d", "p", "q", "dp", "dq", "qi"] {
                assert!(public.get(private).is_none(), "{alg:?} leaks {private}");
            }
            assert_eq!(public["use"], "sig");
            assert_eq!(public["alg"], alg.as_str());
        }
    }

    #[test]
    fn debug_shows_no_private_material() {
        let (key, file) = generated(Algorithm::EdDsa);
        let d = file["d"].as_str().unwrap();
        assert!(!format!("{key:?}").contains(d));
    }

    #[test]
    fn defects_are_named() {
        let (_, rsa) = generated(Algorithm::Rs256);
        let (_, ec) = generated(Algorithm::Es256);
        let (_, ed) = generated(Algorithm::EdDsa);
        let (_, other_ed) = generated(Algorithm::EdDsa);
        let (_, other_ec) = generated(Algorithm::Es256);
        let (_, other_rsa) = generated(Algorithm::Rs256);
        let with = |base: &Value, k: &str, v: Value| {
            let mut x = base.clone();
            x[k] = v;
            x
        };
        let without = |base: &Value, k: &str| {
            let mut x = base.clone();
            x.as_object_mut().unwrap().remove(k);
            x
        };
        let invalid = |e: Result<SigningKey, JwkError>| matches!(e, Err(JwkError::InvalidKeyPair(_)));

        assert!(matches!(
            SigningKey::from_jwk_json(b"not json"),
            Err(JwkError::NotJson(_))
        ));
        assert!(matches!(SigningKey::from_jwk_json(b"[1,2]"), Err(JwkError::NotJson(_))));
        assert!(matches!(SigningKey::from_jwk_json(b""), Err(JwkError::NotJson(_))));
        assert_eq!(load(&without(&ed, "kid")).err(), Some(JwkError::MissingKid));
        assert_eq!(load(&with(&ed, "kid", json!(""))).err(), Some(JwkError::MissingKid));
        assert_eq!(load(&without(&ed, "alg")).err(), Some(JwkError::MissingAlg));
        assert_eq!(
            load(&with(&rsa, "alg", json!("HS256"))).err(),
            Some(JwkError::UnsupportedAlg("HS256".into()))
        );
        assert_eq!(
            load(&with(&rsa, "alg", json!("PS256"))).err(),
            Some(JwkError::UnsupportedAlg("PS256".into()))
        );
        assert_eq!(
            load(&with(&ed, "use", json!("enc"))).err(),
            Some(JwkError::WrongUse("enc".into()))
        );
        assert!(load(&without(&ed, "use")).is_ok());
        assert!(matches!(
            load(&with(&ec, "alg", json!("EdDSA"))),
            Err(JwkError::WrongKty { .. })
        ));
        assert!(matches!(
            load(&with(&ec, "crv", json!("P-384"))),
            Err(JwkError::WrongCurve { .. })
        ));
        for (base, private) in [(&rsa, "d"), (&ec, "d"), (&ed, "d")] {
            assert_eq!(load(&without(base, private)).err(), Some(JwkError::PublicOnly));
        }
        for m in ["n", "e", "p", "q", "dp", "dq", "qi"] {
            assert_eq!(
                load(&without(&rsa, m)).err(),
                Some(JwkError::MissingMember(match m {
                    "n" => "n",
                    "e" => "e",
                    "p" => "p",
                    "q" => "q",
                    "dp" => "dp",
                    "dq" => "dq",
                    _ => "qi",
                })),
                "{m}"
            );
        }
        assert_eq!(load(&without(&ec, "y")).err(), Some(JwkError::MissingMember("y")));
        assert_eq!(load(&without(&ed, "x")).err(), Some(JwkError::MissingMember("x")));
        assert_eq!(
            load(&with(&ed, "d", json!("!!!"))).err(),
            Some(JwkError::BadBase64("d"))
        );
        assert_eq!(
            load(&with(&ed, "x", json!(format!("{}=", ed["x"].as_str().unwrap())))).err(),
            Some(JwkError::BadBase64("x"))
        );
        // Private and public parts from different keys.
        assert!(invalid(load(&with(&ed, "x", other_ed["x"].clone()))));
        assert!(invalid(load(&with(&ec, "d", other_ec["d"].clone()))));
        assert!(invalid(load(&with(&rsa, "d", other_rsa["d"].clone()))));
        assert!(invalid(load(&with(&rsa, "qi", other_rsa["qi"].clone()))));
        assert!(invalid(load(&with(&ed, "d", json!("AAAA")))));
    }

    #[test]
    fn tokens_have_the_fixed_header_and_verify() {
        for alg in [Algorithm::Rs256, Algorithm::Es256, Algorithm::EdDsa] {
            let (key, _) = generated(alg);
            let token = key.sign(&json!({"hello": "world"})).unwrap();
            let parts: Vec<&str> = token.split('.').collect();
            assert_eq!(parts.len(), 3);
            let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
            assert_eq!(header, json!({"alg": alg.as_str(), "kid": key.kid()}));
            let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
            let message = format!("{}.{}", parts[0], parts[1]);
            let public = key.public_jwk();
            let b = |s: &Option<String>| URL_SAFE_NO_PAD.decode(s.as_ref().unwrap()).unwrap();
            match alg {
                Algorithm::Rs256 => {
                    let pk = aws_lc_rs::rsa::PublicKeyComponents {
                        n: b(&public.n),
                        e: b(&public.e),
                    };
                    pk.verify(&signature::RSA_PKCS1_2048_8192_SHA256, message.as_bytes(), &sig)
                        .unwrap();
                }
                Algorithm::Es256 => {
                    let mut point = vec![4u8];
                    point.extend(b(&public.x));
                    point.extend(b(&public.y));
                    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(message.as_bytes(), &sig)
                        .unwrap();
                    assert_eq!(sig.len(), 64);
                }
                Algorithm::EdDsa => {
                    signature::UnparsedPublicKey::new(&signature::ED25519, b(&public.x))
                        .verify(message.as_bytes(), &sig)
                        .unwrap();
                }
            }
        }
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        write_private_jwk(&path, "{}").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(write_private_jwk(&path, "{}").is_err());
        assert!(matches!(
            SigningKey::load(&dir.path().join("missing.json")),
            Err(KeyError::Read { .. })
        ));
        let err = SigningKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("k.json") && err.contains("kid"), "{err}");
    }
}

#[cfg(test)]
mod key_set_tests {
    use super::*;
    use serde_json::{Value, json};

    fn private(alg: Algorithm) -> (SigningKey, Value) {
        let (key, text) = SigningKey::generate(alg, None).unwrap();
        (key, serde_json::from_str(&text).unwrap())
    }

    fn public_of(file: &Value) -> Value {
        let mut v = file.clone();
        for m in ["d", "p", "q", "dp", "dq", "qi"] {
            v.as_object_mut().unwrap().remove(m);
        }
        v
    }

    #[test]
    fn the_jwks_lists_the_active_key_first_and_only_public_parts() {
        let (active, _) = private(Algorithm::Rs256);
        let (_, next) = private(Algorithm::Rs256);
        let (_, old) = private(Algorithm::EdDsa);
        let active_kid = active.kid().to_owned();
        let mut others = public_keys_from_json(next.to_string().as_bytes()).unwrap();
        others.extend(public_keys_from_json(public_of(&old).to_string().as_bytes()).unwrap());
        let set = KeySet::with_published(active, others).unwrap();
        assert_eq!(
            set.kids(),
            [
                active_kid.as_str(),
                next["kid"].as_str().unwrap(),
                old["kid"].as_str().unwrap()
            ]
        );
        let jwks: Value = serde_json::from_str(set.jwks_json()).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], active_kid.as_str());
        for key in jwks["keys"].as_array().unwrap() {
            assert!(key.get("d").is_none() && key.get("p").is_none());
        }
        assert_eq!(set.active().kid(), active_kid);
    }

    #[test]
    fn kids_must_be_distinct() {
        let (active, file) = private(Algorithm::EdDsa);
        let same = public_keys_from_json(public_of(&file).to_string().as_bytes()).unwrap();
        assert!(matches!(
            KeySet::with_published(active, same),
            Err(JwkError::DuplicateKid(_))
        ));
        let (active, _) = private(Algorithm::EdDsa);
        let (_, a) = private(Algorithm::EdDsa);
        let (_, mut b) = private(Algorithm::EdDsa);
        b["kid"] = a["kid"].clone();
        let set = json!({ "keys": [public_of(&a), public_of(&b)] });
        let others = public_keys_from_json(set.to_string().as_bytes()).unwrap();
        assert!(matches!(
            KeySet::with_published(active, others),
            Err(JwkError::DuplicateKid(_))
        ));
    }

    #[test]
    fn a_repeated_kid_is_blamed_on_the_file_that_repeats_it() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, v: &Value| {
            let path = dir.path().join(name);
            std::fs::write(&path, v.to_string()).unwrap();
            path
        };
        let (_, active) = private(Algorithm::EdDsa);
        let (_, other) = private(Algorithm::EdDsa);
        let active_path = write("active.json", &active);
        let fine = write("fine.json", &public_of(&other));
        let repeats = write("repeats.json", &public_of(&active));
        let err = KeySet::load(&active_path, &[fine.clone(), repeats.clone()]).unwrap_err();
        assert!(
            matches!(&err, KeyError::Invalid { path, error: JwkError::DuplicateKid(_) } if *path == repeats),
            "{err}"
        );
        let again = write("again.json", &public_of(&other));
        let err = KeySet::load(&active_path, &[fine, again.clone()]).unwrap_err();
        assert!(
            matches!(&err, KeyError::Invalid { path, .. } if *path == again),
            "{err}"
        );
    }

    #[test]
    fn error_text_names_its_cause_once() {
        let err = SigningKey::load(Path::new("/nonexistent/key.json")).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
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
}
