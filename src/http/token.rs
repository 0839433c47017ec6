//! `POST /v0/token/autojoin` and `POST /v0/token/integration`.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use time::OffsetDateTime;

use super::{ApiError, AppState, Issued};
use crate::cache::Grant;
use crate::claims::{Claims, Principal};

/// The request body. Deserialised by hand because serde's derive would also
/// accept a JSON array (`["key"]`) as a struct, which Go refuses.
struct TokenRequest {
    api_key: Option<String>,
}

impl<'de> Deserialize<'de> for TokenRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RequestVisitor;

        impl<'de> Visitor<'de> for RequestVisitor {
            type Value = TokenRequest;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object with an \"api_key\" string")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TokenRequest, A::Error> {
                let mut api_key: Option<Option<String>> = None;
                while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                    if is_api_key_member(&name) {
                        if api_key.is_some() {
                            return Err(de::Error::duplicate_field("api_key"));
                        }
                        api_key = Some(map.next_value()?);
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(TokenRequest {
                    api_key: api_key.flatten(),
                })
            }
        }

        deserializer.deserialize_map(RequestVisitor)
    }
}

/// Whether a member name is `api_key` as Go's `encoding/json` matches it:
/// ignoring case, with Unicode's simple case folding, under which the
/// Kelvin sign (U+212A) is a `k`. (The only other non-ASCII rune that folds
/// to an ASCII letter, U+017F, folds to `s`, which `api_key` lacks.)
fn is_api_key_member(name: &str) -> bool {
    const KELVIN: char = '\u{212A}';
    let mut chars = name.chars();
    let same = "api_key".chars().all(|want| match chars.next() {
        Some(KELVIN) => want == 'k',
        Some(c) => c.eq_ignore_ascii_case(&want),
        None => false,
    });
    same && chars.next().is_none()
}

/// Why a request body is not a token request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty body")]
    Empty,
    #[error("{0}")]
    Json(String),
}

/// Reads the API key out of a request body.
///
/// Mirrors the Go service, whose callers we must keep working: the content
/// type is not checked (`curl -d` sends a form type); a JSON `null`, a
/// missing or a null `api_key` mean an empty key (401, not 400); anything
/// after the first JSON value is ignored; the member name matches in any
/// case (`API_KEY`). Unlike Go, two members that both match `api_key` are
/// refused (400) instead of silently taking the last one, so two parsers in
/// a chain can never disagree about which key was sent.
pub fn decode_token_request(body: &[u8]) -> Result<String, DecodeError> {
    let body = as_go_reads_it(body);
    let mut values = serde_json::Deserializer::from_slice(&body).into_iter::<Option<TokenRequest>>();
    match values.next() {
        None => Err(DecodeError::Empty),
        // Only the kind of error and its position: serde_json's own message
        // would quote the value, which may be the key.
        Some(Err(e)) => Err(DecodeError::Json(crate::json::describe_error(&e))),
        Some(Ok(request)) => Ok(request.and_then(|r| r.api_key).unwrap_or_default()),
    }
}

/// The body as Go's JSON decoder reads it: invalid UTF-8 and UTF-16
/// surrogate escapes without their other half (`\ud800`) each become
/// U+FFFD, where serde_json would refuse the whole body. A key holding one
/// is then an invalid key (401), as from Go, not an invalid body (400).
fn as_go_reads_it(body: &[u8]) -> Cow<'_, [u8]> {
    let text = match String::from_utf8_lossy(body) {
        Cow::Borrowed(_) => Cow::Borrowed(body),
        Cow::Owned(text) => Cow::Owned(text.into_bytes()),
    };
    if !text.windows(2).any(|w| w == b"\\u") {
        return text;
    }
    let hex = |at: usize| -> Option<u16> {
        let digits = text.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let escape_at = |at: usize| text.get(at..at + 2) == Some(b"\\u".as_slice());
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            out.push(text[i]);
            i += 1;
            continue;
        }
        let unit = if escape_at(i) { hex(i + 2) } else { None };
        match unit {
            Some(0xD800..=0xDBFF) if escape_at(i + 6) && matches!(hex(i + 8), Some(0xDC00..=0xDFFF)) => {
                out.extend_from_slice(&text[i..i + 12]);
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                out.extend_from_slice(b"\\ufffd");
                i += 6;
            }
            // Any other escape, whole (`\\` must not start another one).
            _ => {
                let end = (i + 2).min(text.len());
                out.extend_from_slice(&text[i..end]);
                i = end;
            }
        }
    }
    Cow::Owned(out)
}

/// The body is already in memory: the limits middleware read it (and
/// answered 413, 408 or 400 for one too large, too slow or broken), so
/// taking it as `Bytes` cannot fail.
fn read_key(body: &Bytes) -> Result<String, ApiError> {
    decode_token_request(body).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn issue(state: &AppState, grant: Grant) -> Result<Response, ApiError> {
    let now = (state.clock)();
    let now_utc = OffsetDateTime::from(now);
    // The cache may hold a key past its expiry; the answer is the same
    // refusal as for any other invalid key.
    if grant.expires_at.is_some_and(|expiry| now_utc >= expiry) {
        return Err(ApiError::InvalidKey("the key has expired".into()));
    }
    // After validation, so only valid keys ever get a limiter. A token
    // carries no RateLimit headers: they would cost every exchange bytes on
    // the wire (a few per cent of EdDSA throughput) for what the 429 says.
    if let Some(limits) = &state.rate_limits {
        limits.check(&grant.principal).map_err(|refusal| {
            let tier = match &grant.principal {
                Principal::Integration { tier, .. } => Cow::Owned(tier.to_string()),
                Principal::Autojoin { .. } => Cow::Borrowed("autojoin"),
            };
            state.metrics.rate_limited.with_label_values(&[tier.as_ref()]).inc();
            ApiError::RateLimited(Box::new(refusal))
        })?;
    }
    let principal = grant.principal;
    let claims = Claims::new(principal.clone(), now).not_after(grant.expires_at);
    let keys = state.keys.load();
    let key = keys.active();
    let started = Instant::now();
    let token = key.sign(&claims).map_err(|e| ApiError::Signing(e.to_string()))?;
    state.metrics.signing(key.alg(), started.elapsed());
    // Written as is: a token is base64url and dots, nothing JSON escapes.
    // Go's json.Encoder ends the document with a newline; keep it.
    let mut body = Vec::with_capacity(token.len() + 13);
    body.extend_from_slice(b"{\"token\":\"");
    body.extend_from_slice(token.as_bytes());
    body.extend_from_slice(b"\"}\n");
    state.usage.record(&grant.usage, now_utc);
    let mut response = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    response.extensions_mut().insert(Issued(principal));
    Ok(response)
}

pub(super) async fn integration(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let key = read_key(&body)?;
    let grant = state.validator.integration(&key).await?;
    issue(&state, grant)
}

pub(super) async fn autojoin(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let key = read_key(&body)?;
    let grant = state.validator.autojoin(&key).await?;
    issue(&state, grant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_follows_the_go_service() {
        let ok = |b: &str| decode_token_request(b.as_bytes());
        assert_eq!(ok(r#"{"api_key":"k"}"#), Ok("k".into()));
        assert_eq!(ok(r#" {"api_key":"k","other":1} "#), Ok("k".into()));
        assert_eq!(ok(r#"{"api_key":"k"} trailing"#), Ok("k".into()));
        assert_eq!(ok("{}"), Ok(String::new()));
        assert_eq!(ok("null"), Ok(String::new()));
        assert_eq!(ok(r#"{"api_key":null}"#), Ok(String::new()));
        assert_eq!(ok(""), Err(DecodeError::Empty));
        assert_eq!(ok("  \n"), Err(DecodeError::Empty));
        for bad in [
            r#"{"api_key":123}"#,
            "[]",
            r#"["k"]"#,
            "{",
            r#""k""#,
            "1",
            r#"{"api_key":"a","api_key":"b"}"#,
        ] {
            assert!(matches!(ok(bad), Err(DecodeError::Json(_))), "{bad}");
        }
    }

    #[test]
    fn broken_text_in_a_key_is_read_as_go_reads_it() {
        let ok = |b: &[u8]| decode_token_request(b);
        // Invalid UTF-8 and lone surrogates: U+FFFD, as Go's decoder makes.
        assert_eq!(ok(b"{\"api_key\":\"a\xffb\"}"), Ok("a\u{FFFD}b".into()));
        assert_eq!(ok(br#"{"api_key":"a\ud800b"}"#), Ok("a\u{FFFD}b".into()));
        assert_eq!(ok(br#"{"api_key":"\udc00"}"#), Ok("\u{FFFD}".into()));
        assert_eq!(ok(br#"{"api_key":"\ud800\ud800"}"#), Ok("\u{FFFD}\u{FFFD}".into()));
        assert!(
            matches!(ok(br#"{"api_key":"\ud800"#), Err(DecodeError::Json(_))),
            "unterminated"
        );
        // A pair is one character; an escaped backslash starts no escape.
        assert_eq!(ok(br#"{"api_key":"\ud83d\ude00"}"#), Ok("\u{1F600}".into()));
        assert_eq!(ok(br#"{"api_key":"\\ud800"}"#), Ok("\\ud800".into()));
        assert_eq!(ok(br#"{"api_key":"\u00e9\n"}"#), Ok("\u{e9}\n".into()));
        // Still not JSON: still 400.
        assert!(matches!(ok(br#"{"api_key":"\uzzzz"}"#), Err(DecodeError::Json(_))));
        assert!(matches!(ok(b"{\"api_key\":\xff}"), Err(DecodeError::Json(_))));
    }

    #[test]
    fn the_member_name_matches_in_any_case_as_in_go() {
        let ok = |b: &str| decode_token_request(b.as_bytes());
        for name in [
            "api_key",
            "API_KEY",
            "Api_Key",
            "aPi_kEy",
            "api_\u{212A}ey",
            "api\\u005fkey",
        ] {
            assert_eq!(ok(&format!(r#"{{"{name}":"k"}}"#)), Ok("k".into()), "{name}");
        }
        for name in [
            "apikey",
            "api-key",
            "api_key ",
            "api_keys",
            "api_\u{17F}ey",
            "ápi_key",
            "",
        ] {
            assert_eq!(ok(&format!(r#"{{"{name}":"k"}}"#)), Ok(String::new()), "{name}");
        }
        // Two members that match, in any case, are refused.
        for body in [r#"{"api_key":"a","API_KEY":"b"}"#, r#"{"Api_Key":"a","api_key":"a"}"#] {
            assert!(matches!(ok(body), Err(DecodeError::Json(_))), "{body}");
        }
    }

    #[test]
    fn decode_errors_do_not_echo_the_key() {
        let secret = "mlabk.cii_a.ki_b.SECRETSECRET";
        for body in [
            format!(r#"{{"api_key":"{secret}","api_key":"{secret}"}}"#),
            // Found by the request_body fuzz target: a JSON string instead of
            // an object made serde_json quote it in the error.
            format!(r#""{secret}""#),
            format!(r#"["{secret}"]"#),
            format!(r#"{{"api_key":{{"k":"{secret}"}}}}"#),
        ] {
            let err = decode_token_request(body.as_bytes()).unwrap_err().to_string();
            assert!(!err.contains("SECRETSECRET"), "{err}");
        }
    }
}
