//! The rulebook every backend follows: what each admin write means beyond
//! its rows. For each operation this module decides, once, the audit
//! record (action, subject, the state before and after), the change it
//! publishes for servers to drop from their caches, the state a change
//! leaves, and the errors a request that cannot be carried out gets. A
//! backend reads what the rule needs inside its transaction, asks the rule,
//! writes the rows, and hands the returned [`Effects`] to its one writer of
//! audit records and published changes, in the same transaction.
//!
//! The conformance suite (`tests/conformance`) holds every backend to it.

use time::OffsetDateTime;

use super::changes::Invalidation;
use super::{AuditRecord, KeyChange, NewIntegrationKey, STATUS_ACTIVE, STATUS_REVOKED, StoreError};

/// What a write records and publishes, committed with it.
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a write's audit record and published change are part of its transaction"]
pub struct Effects {
    pub audit: AuditRecord,
    /// `None`: the write makes nothing a server has cached stale.
    pub publish: Option<Invalidation>,
}

/// The audited values of an integration key, expiry as stored text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValues {
    pub status: String,
    pub tier: i64,
    pub expires_at: Option<String>,
}

impl KeyValues {
    fn audited(&self) -> serde_json::Value {
        serde_json::json!({ "status": self.status, "tier": self.tier, "expires_at": self.expires_at })
    }
}

fn autojoin_values(expires_at: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "expires_at": expires_at })
}

/// Expiries are kept to the second, as JWT times are: what is stored,
/// printed and put in `exp` is then the same instant on every backend.
pub fn expiry_text(t: OffsetDateTime) -> String {
    super::rfc3339(t.replace_nanosecond(0).unwrap_or(t))
}

/// The instant [`expiry_text`] keeps.
pub fn expiry_instant(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// Creating an integration key (`integration create`, or `key rotate`
/// naming the key it replaces). A new key was never cached by a server (a
/// key ID is random), so nothing is published.
pub fn create_integration_key(operator: &str, key: &NewIntegrationKey) -> Effects {
    let values = KeyValues {
        status: STATUS_ACTIVE.to_owned(),
        tier: key.tier,
        expires_at: key.expires_at.map(expiry_text),
    };
    let mut after = values.audited();
    let action = match &key.replaces {
        Some(old) => {
            after["replaces"] = serde_json::Value::String(old.clone());
            "key rotate"
        }
        None => "integration create",
    };
    Effects {
        audit: AuditRecord::new(operator, action)
            .key(&key.integration_id, &key.key_id)
            .change(None, Some(after)),
        publish: None,
    }
}

/// Changing a key's status, tier or expiry: the values it leaves (the rest
/// as they were) and what it records. Every transition is allowed, the same
/// one again included (an operator revoking twice gets two records and the
/// key stays revoked).
pub fn change_integration_key(
    operator: &str,
    integration_id: &str,
    key_id: &str,
    before: &KeyValues,
    change: &KeyChange,
) -> (KeyValues, Effects) {
    let mut after = before.clone();
    let action = match change {
        KeyChange::Status(status) => {
            after.status.clone_from(status);
            if status == STATUS_REVOKED {
                "key revoke"
            } else {
                "key activate"
            }
        }
        KeyChange::Tier(tier) => {
            after.tier = *tier;
            "key set-tier"
        }
        KeyChange::Expiry(expires_at) => {
            after.expires_at = expires_at.map(expiry_text);
            "key set-expiry"
        }
    };
    let effects = Effects {
        audit: AuditRecord::new(operator, action)
            .key(integration_id, key_id)
            .change(Some(before.audited()), Some(after.audited())),
        publish: Some(integration_key_changed(integration_id, key_id)),
    };
    (after, effects)
}

/// Deleting one integration key.
pub fn delete_integration_key(operator: &str, integration_id: &str, key_id: &str, before: &KeyValues) -> Effects {
    Effects {
        audit: AuditRecord::new(operator, "key delete")
            .key(integration_id, key_id)
            .change(Some(before.audited()), None),
        publish: Some(integration_key_changed(integration_id, key_id)),
    }
}

/// Deleting an integration and the `keys` keys it had.
pub fn delete_integration(operator: &str, integration_id: &str, keys: usize) -> Effects {
    Effects {
        audit: AuditRecord::new(operator, "integration delete")
            .integration(integration_id)
            .change(Some(serde_json::json!({ "keys": keys })), None),
        publish: Some(Invalidation::Integration {
            integration_id: integration_id.to_owned(),
        }),
    }
}

/// Creating an autojoin organization; it has no keys to be cached yet.
pub fn create_org(operator: &str, org: &str, email: &str) -> Effects {
    Effects {
        audit: AuditRecord::new(operator, "autojoin create-org")
            .org(org)
            .change(None, Some(serde_json::json!({ "email": email }))),
        publish: None,
    }
}

/// Adding a key (by its hash) to an organization. A server may have cached
/// the key as unknown, but only if someone presented it before it existed,
/// which for 43 random characters nobody does.
pub fn create_autojoin_key(operator: &str, org: &str, key_hash: &str, expires_at: Option<OffsetDateTime>) -> Effects {
    Effects {
        audit: AuditRecord::new(operator, "autojoin create-key")
            .org(org)
            .fingerprint(&crate::api_key::fingerprint_of_hash(key_hash))
            .change(None, Some(autojoin_values(expires_at.map(expiry_text).as_deref()))),
        publish: None,
    }
}

/// A change to one autojoin key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutojoinChange {
    Delete,
    /// A new expiry, or none.
    Expiry(Option<OffsetDateTime>),
}

/// Deleting an autojoin key or setting its expiry, `before` being its
/// expiry as stored: the expiry it leaves (`None` when deleted) and what
/// it records.
pub fn change_autojoin_key(
    operator: &str,
    org: &str,
    key_hash: &str,
    before: Option<&str>,
    change: AutojoinChange,
) -> (Option<Option<String>>, Effects) {
    let (action, after) = match change {
        AutojoinChange::Delete => ("autojoin delete-key", None),
        AutojoinChange::Expiry(at) => ("autojoin set-expiry", Some(at.map(expiry_text))),
    };
    let audit = AuditRecord::new(operator, action)
        .org(org)
        .fingerprint(&crate::api_key::fingerprint_of_hash(key_hash))
        .change(
            Some(autojoin_values(before)),
            after.as_ref().map(|a| autojoin_values(a.as_deref())),
        );
    let effects = Effects {
        audit,
        publish: Some(Invalidation::Organization { org: org.to_owned() }),
    };
    (after, effects)
}

/// Deleting an organization and the `keys` keys it had.
pub fn delete_org(operator: &str, org: &str, keys: usize) -> Effects {
    Effects {
        audit: AuditRecord::new(operator, "autojoin delete-org")
            .org(org)
            .change(Some(serde_json::json!({ "keys": keys })), None),
        publish: Some(Invalidation::Organization { org: org.to_owned() }),
    }
}

fn integration_key_changed(integration_id: &str, key_id: &str) -> Invalidation {
    Invalidation::IntegrationKey {
        integration_id: integration_id.to_owned(),
        key_id: key_id.to_owned(),
    }
}

/// Shortest fingerprint prefix accepted to pick an autojoin key: fewer hex
/// digits would make picking the wrong key too easy.
pub const MIN_FINGERPRINT_LEN: usize = 8;

/// Picks the one key of `org` whose hash (`hash_of`) starts with
/// `fingerprint`: `NotFound` if none does, `Ambiguous` if several do.
pub fn pick_by_fingerprint<T>(
    org: &str,
    fingerprint: &str,
    keys: impl IntoIterator<Item = T>,
    hash_of: impl Fn(&T) -> &str,
) -> Result<T, StoreError> {
    check_fingerprint(fingerprint)?;
    let mut matches: Vec<T> = keys
        .into_iter()
        .filter(|k| hash_of(k).starts_with(fingerprint))
        .collect();
    match matches.len() {
        0 => Err(StoreError::NotFound(format!(
            "a key with fingerprint {fingerprint} in organization {org}"
        ))),
        1 => Ok(matches.remove(0)),
        n => Err(StoreError::Ambiguous(format!(
            "{n} keys of organization {org} start with {fingerprint}; give more of the fingerprint"
        ))),
    }
}

/// A fingerprint is lowercase hex, long enough to be safe.
pub fn check_fingerprint(fingerprint: &str) -> Result<(), StoreError> {
    let hex = fingerprint
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex || fingerprint.len() < MIN_FINGERPRINT_LEN || fingerprint.len() > 64 {
        return Err(StoreError::Config(format!(
            "a fingerprint is {MIN_FINGERPRINT_LEN} to 64 lowercase hex digits, as `autojoin list-keys` shows them"
        )));
    }
    Ok(())
}

/// Usage adds up and keeps the later last use, whichever replica wrote
/// first: `(tokens, last_used_at)` after adding `tokens` used at `used`.
pub fn add_usage(
    tokens: i64,
    last_used_at: Option<OffsetDateTime>,
    added: u64,
    used: OffsetDateTime,
) -> (i64, Option<OffsetDateTime>) {
    let added = i64::try_from(added).unwrap_or(i64::MAX);
    (tokens.saturating_add(added), last_used_at.max(Some(used)))
}

pub fn integration_not_found(integration_id: &str) -> StoreError {
    StoreError::NotFound(format!("integration {integration_id}"))
}

pub fn key_not_found(integration_id: &str, key_id: &str) -> StoreError {
    StoreError::NotFound(format!("key {key_id} of integration {integration_id}"))
}

pub fn key_exists(integration_id: &str, key_id: &str) -> StoreError {
    StoreError::AlreadyExists(format!("key {key_id} of integration {integration_id}"))
}

pub fn org_not_found(org: &str) -> StoreError {
    StoreError::NotFound(format!("organization {org}"))
}

pub fn org_exists(org: &str) -> StoreError {
    StoreError::AlreadyExists(format!("organization {org}"))
}

pub fn autojoin_key_exists() -> StoreError {
    StoreError::AlreadyExists("that autojoin key".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(status: &str, tier: i64, expires_at: Option<&str>) -> KeyValues {
        KeyValues {
            status: status.into(),
            tier,
            expires_at: expires_at.map(str::to_owned),
        }
    }

    #[test]
    fn a_key_change_keeps_what_it_does_not_change() {
        let before = values("active", 2, Some("2030-01-01T00:00:00Z"));
        let (after, effects) = change_integration_key("op", "acme", "ki_1", &before, &KeyChange::Tier(5));
        assert_eq!(after, values("active", 5, Some("2030-01-01T00:00:00Z")));
        assert_eq!(effects.audit.action, "key set-tier");
        assert_eq!(effects.audit.before.as_ref().unwrap()["tier"], 2);
        assert_eq!(effects.audit.after.as_ref().unwrap()["tier"], 5);
        assert_eq!(
            effects.audit.after.as_ref().unwrap()["expires_at"],
            "2030-01-01T00:00:00Z"
        );
        assert_eq!(
            effects.publish,
            Some(Invalidation::IntegrationKey {
                integration_id: "acme".into(),
                key_id: "ki_1".into()
            })
        );
        let (after, effects) =
            change_integration_key("op", "acme", "ki_1", &before, &KeyChange::Status(STATUS_REVOKED.into()));
        assert_eq!(
            (after.status.as_str(), effects.audit.action.as_str()),
            ("revoked", "key revoke")
        );
        let t = OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap() + time::Duration::milliseconds(700);
        let (after, _) = change_integration_key("op", "acme", "ki_1", &before, &KeyChange::Expiry(Some(t)));
        assert_eq!(after.expires_at.as_deref(), Some("2030-03-17T17:46:40Z"));
    }

    #[test]
    fn fingerprints_pick_exactly_one_key() {
        let keys = ["abcdef0123", "abcdef0199", "12345678ff"];
        assert_eq!(pick_by_fingerprint("o", "12345678", keys, |k| k).unwrap(), "12345678ff");
        assert!(matches!(
            pick_by_fingerprint("o", "abcdef01", keys, |k| k),
            Err(StoreError::Ambiguous(m)) if m.starts_with("2 keys")
        ));
        assert!(matches!(
            pick_by_fingerprint("o", "00000000", keys, |k| k),
            Err(StoreError::NotFound(_))
        ));
        for bad in ["abc", "ABCDEF01", "abcdef0g"] {
            assert!(matches!(
                pick_by_fingerprint("o", bad, keys, |k| k),
                Err(StoreError::Config(_))
            ));
        }
    }

    #[test]
    fn usage_adds_up_and_keeps_the_later_use() {
        let t = |s| OffsetDateTime::from_unix_timestamp(s).unwrap();
        assert_eq!(add_usage(3, Some(t(20)), 2, t(10)), (5, Some(t(20))));
        assert_eq!(add_usage(0, None, 1, t(10)), (1, Some(t(10))));
        assert_eq!(add_usage(i64::MAX, None, u64::MAX, t(1)).0, i64::MAX);
    }
}
