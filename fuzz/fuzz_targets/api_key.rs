//! The API key parsers: any input either parses into parts that respect
//! every limit and re-form the input, or is refused; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use token_exchange::api_key::{
    AutojoinApiKey, IntegrationApiKey, MAX_API_KEY_LEN, MAX_INTEGRATION_ID_LEN, MAX_KEY_ID_LEN, MAX_SECRET_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(key) = text.parse::<IntegrationApiKey>() {
        assert!(text.len() <= MAX_API_KEY_LEN);
        assert!(!key.integration_id().is_empty() && key.integration_id().len() <= MAX_INTEGRATION_ID_LEN);
        assert!(key.key_id().starts_with("ki_") && key.key_id().len() > 3 && key.key_id().len() <= MAX_KEY_ID_LEN);
        let secret = key.secret().expose();
        assert!(!secret.is_empty() && secret.len() <= MAX_SECRET_LEN && !secret.contains('.'));
        assert_eq!(key.to_secret_string().expose(), text);
        assert!(key.secret().matches_hash(&key.secret().sha256_hex()));
    }
    if let Ok(key) = text.parse::<AutojoinApiKey>() {
        assert_eq!(key.secret().expose(), text);
        assert_eq!(key.fingerprint().len(), 12);
    }
});
