//! The keys the service works with: the one that signs, and every key the
//! JWKS publishes.

use std::path::{Path, PathBuf};

use super::jwk::truncate;
use super::{JwkError, Jwks, KeyError, PublicJwk, SigningKey, load_public_keys};

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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::test_keys::{generated as private, public_of};
    use super::super::{Algorithm, public_keys_from_json};
    use super::*;

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
}
