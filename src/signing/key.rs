//! A loaded private key: built from checked JWK members by aws-lc's
//! constructors (which check that the private and public parts agree), and
//! signing compact JWS tokens with a header encoded once.

use std::fmt;
use std::path::Path;

use aws_lc_rs::rsa::{KeyPairComponents, PublicKeyComponents};
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

use super::jwk::{JwkMembers, check_rsa_exponent, checked_header, member};
use super::{Algorithm, JwkError, KeyError, PublicJwk};

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
        let bytes = super::read_key_file(path).map_err(|error| KeyError::Read {
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

    pub(crate) fn from_members(m: &JwkMembers) -> Result<Self, JwkError> {
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
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::test_keys::{generated, load};
    use super::*;

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
    fn debug_names_the_key_and_never_its_secret() {
        let (key, jwk) = SigningKey::generate(Algorithm::EdDsa, Some("k-1".to_owned())).unwrap();
        let shown = format!("{key:?}");
        assert!(
            shown.starts_with("SigningKey {") && shown.contains("k-1") && shown.contains("EdDsa"),
            "{shown}"
        );
        let private: serde_json::Value = serde_json::from_str(&jwk).unwrap();
        assert!(!shown.contains(private["d"].as_str().unwrap()), "{shown}");
    }
}
