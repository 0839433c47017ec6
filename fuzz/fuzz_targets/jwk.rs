//! The JWK loaders: a private key file and a public key (set) file. Any
//! input loads or is refused with a reason; a loaded key signs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use token_exchange::signing::{SigningKey, public_keys_from_json};

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = SigningKey::from_jwk_json(data) {
        let token = key.sign(&serde_json::json!({"fuzz": true})).expect("a loaded key signs");
        assert_eq!(token.split('.').count(), 3);
        assert!(!key.kid().is_empty());
    }
    if let Ok(keys) = public_keys_from_json(data) {
        for key in keys {
            assert!(!key.kid.is_empty());
        }
    }
});
