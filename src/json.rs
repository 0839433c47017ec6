//! JSON error text that is safe to log.
//!
//! serde_json's messages quote the offending value ("invalid type: string
//! \"...\", expected ..."), and the value may be an API key or private key
//! material. Only the kind of error and its position ever leave this module.

/// `syntax error at line 1 column 12`, and never any of the input.
pub fn describe_error(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected shape (a member has the wrong type or is repeated)",
        serde_json::error::Category::Eof => "unexpected end of input",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_never_appear() {
        for input in [
            r#""mlabk.cii_a.ki_b.SECRETSECRET""#,
            r#"{"api_key": ["SECRETSECRET"]}"#,
            r#"{"d": "SECRETSECRET", "kid": 5}"#,
            r#"SECRETSECRET"#,
        ] {
            #[derive(Debug, serde::Deserialize)]
            #[allow(dead_code)]
            struct Shape {
                api_key: Option<String>,
                kid: Option<String>,
            }
            let e = serde_json::from_str::<Shape>(input).unwrap_err();
            assert!(
                e.to_string().contains("SECRET") || !input.starts_with('"'),
                "serde_json echoes values"
            );
            let text = describe_error(&e);
            assert!(!text.contains("SECRET"), "{text}");
            assert!(text.contains("line 1"), "{text}");
        }
    }
}
