//! The two token shapes: who they are for and how long they live.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// `iss` of every token. Verifiers (Cloud Endpoints, the locate service)
/// are configured with this exact string.
pub const ISSUER: &str = "token-exchange";

/// Autojoin tokens are held by platform nodes, which refresh them when fewer
/// than 5 minutes remain; an hour keeps refreshes rare without making a
/// stolen token useful for long.
pub const AUTOJOIN_LIFETIME: Duration = Duration::from_secs(3600);

/// Integration tokens are handed to an end user's client, which uses them at
/// once to reach the locate service. 20 s covers that hop (and 60 s of
/// verifier clock skew is on top), while a token copied out of a page is
/// worthless almost immediately.
pub const INTEGRATION_LIFETIME: Duration = Duration::from_secs(20);

/// Who a token speaks for: the identity a validated key resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Principal {
    /// An autojoin organization.
    Autojoin { org: String },
    /// A client integration and the key it used.
    Integration {
        /// Without the `cii_` prefix.
        int_id: String,
        /// With the `ki_` prefix.
        key_id: String,
        /// Service level; 0 is the default.
        tier: i64,
    },
}

impl Principal {
    pub fn audience(&self) -> &'static str {
        match self {
            Principal::Autojoin { .. } => "autojoin",
            Principal::Integration { .. } => "integration",
        }
    }

    pub fn lifetime(&self) -> Duration {
        match self {
            Principal::Autojoin { .. } => AUTOJOIN_LIFETIME,
            Principal::Integration { .. } => INTEGRATION_LIFETIME,
        }
    }
}

/// The JWT claim set. Field order is the order in the token.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    pub iss: &'static str,
    /// A plain string, not an array: some verifiers compare it as one.
    pub aud: &'static str,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    #[serde(flatten)]
    pub principal: Principal,
}

impl Claims {
    /// Claims for `principal`, issued at `now` (whole seconds, rounded down).
    pub fn new(principal: Principal, now: SystemTime) -> Self {
        // A clock before 1970 is a broken host; issuing at 0 yields tokens
        // that are already expired, which fails safe.
        let iat = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut random = [0u8; 16];
        crate::ground::fill_random(&mut random);
        Self {
            iss: ISSUER,
            aud: principal.audience(),
            iat,
            nbf: iat,
            exp: iat + principal.lifetime().as_secs(),
            jti: uuid::Builder::from_random_bytes(random).into_uuid().to_string(),
            principal,
        }
    }
}

impl Claims {
    /// Caps `exp` at `limit` (a key's expiry): a token never outlives the
    /// key it was bought with.
    pub fn not_after(mut self, limit: Option<time::OffsetDateTime>) -> Self {
        if let Some(limit) = limit {
            let limit = u64::try_from(limit.unix_timestamp()).unwrap_or(0);
            self.exp = self.exp.min(limit);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn integration_claims() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_900);
        let c = Claims::new(
            Principal::Integration {
                int_id: "acme".into(),
                key_id: "ki_00".into(),
                tier: 0,
            },
            now,
        );
        let mut v = serde_json::to_value(&c).unwrap();
        let jti = v.as_object_mut().unwrap().remove("jti").unwrap();
        assert_eq!(
            v,
            json!({"iss":"token-exchange","aud":"integration","iat":1_700_000_000u64,
                   "nbf":1_700_000_000u64,"exp":1_700_000_020u64,
                   "int_id":"acme","key_id":"ki_00","tier":0})
        );
        let jti = uuid::Uuid::parse_str(jti.as_str().unwrap()).unwrap();
        assert_eq!(jti.get_version_num(), 4);
        assert_eq!(jti.get_variant(), uuid::Variant::RFC4122);
    }

    #[test]
    fn autojoin_claims() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let c = Claims::new(Principal::Autojoin { org: "mlab".into() }, now);
        let v: Value = serde_json::to_value(&c).unwrap();
        assert_eq!(v["aud"], "autojoin");
        assert_eq!(v["org"], "mlab");
        assert_eq!(v["exp"], 4_600);
        assert!(v.get("tier").is_none() && v.get("sub").is_none());
        assert_ne!(c.jti, Claims::new(Principal::Autojoin { org: "m".into() }, now).jti);
    }

    #[test]
    fn a_token_never_outlives_its_key() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let principal = Principal::Autojoin { org: "mlab".into() };
        let at = |secs: i64| Some(time::OffsetDateTime::from_unix_timestamp(secs).unwrap());
        assert_eq!(Claims::new(principal.clone(), now).not_after(None).exp, 4_600);
        assert_eq!(Claims::new(principal.clone(), now).not_after(at(2_000)).exp, 2_000);
        assert_eq!(Claims::new(principal.clone(), now).not_after(at(4_600)).exp, 4_600);
        assert_eq!(Claims::new(principal.clone(), now).not_after(at(9_999)).exp, 4_600);
        // An expiry before 1970 (a broken store) ends the token at once.
        assert_eq!(Claims::new(principal, now).not_after(at(-5)).exp, 0);
    }
}
