//! New keys (in the layout jose-util writes, `kid` the RFC 7638
//! thumbprint unless given) and private key files.

use std::path::Path;

use aws_lc_rs::encoding::{AsBigEndian, AsDer};
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::der;
use super::jwk::{JwkMembers, thumbprint};
use super::{Algorithm, SigningKey};

impl SigningKey {
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

/// aws-lc could not generate a key; nothing to recover.
#[derive(Debug, thiserror::Error)]
#[error("key generation failed")]
pub struct GenerateError;

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

#[cfg(test)]
mod tests {
    use super::super::KeyError;
    use super::super::test_keys::{generated, load};
    use super::*;

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
