//! The request-body decoder: any bytes give a key or a refusal, and a
//! refusal's message never repeats what was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use token_exchange::http::decode_token_request;

fuzz_target!(|data: &[u8]| {
    match decode_token_request(data) {
        Ok(key) => {
            // A decoded key came from the body, so the body is at least as long.
            assert!(key.len() <= data.len());
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.len() < 200, "{message}");
        }
    }
});
