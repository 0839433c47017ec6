//! The cases, each run unchanged on every backend.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;
use token_exchange::api_key::{AutojoinApiKey, IntegrationApiKey};
use token_exchange::store::changes::{ChangeFeed, Invalidation};
use token_exchange::store::{
    AuditFilter, AuditRecord, KeyChange, KeyUsage, NewAutojoinKey, NewIntegrationKey, Store, StoreError, UsageKey,
};

use crate::backends::Fixture;

/// Longest wait for a published change (the emulator is the slowest).
const DEADLINE: Duration = Duration::from_secs(20);

fn new_key(integration: &str, tier: i64, expires_at: Option<OffsetDateTime>) -> (IntegrationApiKey, NewIntegrationKey) {
    let key = IntegrationApiKey::generate(integration, None);
    let new = NewIntegrationKey {
        integration_id: integration.into(),
        integration_description: format!("{integration} integration"),
        key_id: key.key_id().into(),
        key_hash: key.secret().sha256_hex(),
        key_description: "a key".into(),
        tier,
        created_at: OffsetDateTime::now_utc(),
        expires_at,
        replaces: None,
    };
    (key, new)
}

/// A whole second in the future, as the CLI makes expiries.
fn in_days(days: i64) -> OffsetDateTime {
    let t = OffsetDateTime::now_utc() + time::Duration::days(days);
    t.replace_nanosecond(0).unwrap()
}

fn text(t: OffsetDateTime) -> String {
    token_exchange::store::rfc3339(t)
}

fn key_changed(integration_id: &str, key_id: &str) -> Invalidation {
    Invalidation::IntegrationKey {
        integration_id: integration_id.into(),
        key_id: key_id.into(),
    }
}

fn org_changed(org: &str) -> Invalidation {
    Invalidation::Organization { org: org.into() }
}

/// A server's view of the feed: what was published between two reads,
/// told apart by a marker change that every read ends with (a change to a
/// key of its own, so that a marker left over from a read that lost its
/// place is never taken for the current one).
struct Watch {
    feed: Box<dyn ChangeFeed>,
    store: Arc<dyn Store>,
}

const MARKER: &str = "zz-marker";

impl Watch {
    async fn new(f: &Fixture) -> Self {
        let mut feed = f.store.change_feed(Duration::from_millis(50));
        assert!(
            feed.next().await.unwrap().is_empty(),
            "the first read only finds its place"
        );
        Self {
            feed,
            store: f.store.clone(),
        }
    }

    /// Publishes a marker change; what it publishes.
    async fn mark(&self) -> Invalidation {
        let (_, marker) = new_key(MARKER, 0, None);
        self.store.create_integration_key(&marker).await.unwrap();
        self.store
            .update_integration_key(MARKER, &marker.key_id, KeyChange::Tier(1))
            .await
            .unwrap();
        key_changed(MARKER, &marker.key_id)
    }

    /// Everything published since the last call, in order (markers left out).
    async fn published(&mut self) -> Vec<Invalidation> {
        let mut marker = self.mark().await;
        let started = Instant::now();
        let mut seen = Vec::new();
        loop {
            assert!(
                started.elapsed() < DEADLINE,
                "the marker change never arrived; read {seen:?}"
            );
            let notices = tokio::time::timeout(DEADLINE, self.feed.next())
                .await
                .expect("a feed read within its interval")
                .unwrap();
            for n in notices {
                if n.what == marker {
                    return seen;
                }
                if matches!(&n.what, Invalidation::IntegrationKey { integration_id, .. } if integration_id == MARKER) {
                    continue;
                }
                if n.what == Invalidation::Everything {
                    // The feed gave up its place, and may have skipped the
                    // marker with it: mark again.
                    marker = self.mark().await;
                }
                seen.push(n.what);
            }
        }
    }
}

async fn audit(store: &Arc<dyn Store>, filter: AuditFilter) -> Vec<AuditRecord> {
    store.audit_log(&filter).await.unwrap()
}

async fn audit_of_integration(store: &Arc<dyn Store>, integration_id: &str) -> Vec<AuditRecord> {
    audit(
        store,
        AuditFilter {
            integration_id: Some(integration_id.into()),
            ..AuditFilter::default()
        },
    )
    .await
}

async fn audit_of_org(store: &Arc<dyn Store>, org: &str) -> Vec<AuditRecord> {
    audit(
        store,
        AuditFilter {
            org: Some(org.into()),
            ..AuditFilter::default()
        },
    )
    .await
}

fn state(status: &str, tier: i64, expires_at: Option<&str>) -> Option<Value> {
    Some(json!({ "status": status, "tier": tier, "expires_at": expires_at }))
}

pub async fn integration_keys_are_created_and_looked_up(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let expiry = in_days(30);
    let (key, new) = new_key("acme", 3, Some(expiry));
    assert!(
        s.create_integration_key(&new).await.unwrap(),
        "{}: the integration is new",
        f.backend
    );
    let record = s.integration_key("acme", key.key_id()).await.unwrap().unwrap();
    assert_eq!((record.status.as_str(), record.tier), ("active", 3));
    assert_eq!(record.expires_at, Some(expiry));
    assert!(key.secret().matches_hash(&record.key_hash));
    assert_eq!(s.integration_key("acme", "ki_other").await.unwrap(), None);
    assert_eq!(s.integration_key("other", key.key_id()).await.unwrap(), None);

    // A second key joins the integration; a key ID in use is refused and
    // leaves the first as it was.
    let (_, second) = new_key("acme", 0, None);
    assert!(!s.create_integration_key(&second).await.unwrap());
    let mut dup = new_key("acme", 0, None).1;
    dup.key_id = new.key_id.clone();
    let err = s.create_integration_key(&dup).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists(m) if m.contains(&new.key_id)),
        "{err}"
    );
    let record = s.integration_key("acme", key.key_id()).await.unwrap().unwrap();
    assert!(key.secret().matches_hash(&record.key_hash));

    // A rotation names the key it replaces.
    let (_, mut rotated) = new_key("acme", 3, Some(expiry));
    rotated.replaces = Some(new.key_id.clone());
    s.create_integration_key(&rotated).await.unwrap();

    let records = audit_of_integration(s, "acme").await;
    let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["integration create", "integration create", "key rotate"],
        "{}",
        f.backend
    );
    let first = &records[0];
    assert_eq!(first.operator, "tester");
    assert_eq!(first.key_id.as_deref(), Some(new.key_id.as_str()));
    assert_eq!(first.before, None);
    assert_eq!(first.after, state("active", 3, Some(&text(expiry))));
    assert_eq!(records[2].after.as_ref().unwrap()["replaces"], json!(new.key_id));
    assert_eq!(records[2].after.as_ref().unwrap()["expires_at"], json!(text(expiry)));
    // New keys were never cached anywhere: nothing is published.
    assert_eq!(watch.published().await, vec![], "{}", f.backend);
    assert!(!s.is_empty().await.unwrap());
    s.ping().await.unwrap();
    assert!(s.capacity() > 0);
    assert_eq!(s.backend(), f.backend);
}

pub async fn each_key_change_is_audited_and_published(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let (key, new) = new_key("acme", 1, None);
    s.create_integration_key(&new).await.unwrap();
    let id = new.key_id.as_str();
    let expiry = in_days(7);
    let steps: [(KeyChange, &str, Option<Value>); 5] = [
        (
            KeyChange::Status("revoked".into()),
            "key revoke",
            state("revoked", 1, None),
        ),
        (KeyChange::Tier(4), "key set-tier", state("revoked", 4, None)),
        (
            KeyChange::Status("active".into()),
            "key activate",
            state("active", 4, None),
        ),
        (
            KeyChange::Expiry(Some(expiry)),
            "key set-expiry",
            state("active", 4, Some(&text(expiry))),
        ),
        (KeyChange::Expiry(None), "key set-expiry", state("active", 4, None)),
    ];
    let mut before = state("active", 1, None);
    for (change, action, after) in steps {
        s.update_integration_key("acme", id, change.clone()).await.unwrap();
        let record = audit_of_integration(s, "acme").await.pop().unwrap();
        assert_eq!(record.action, action, "{}: {change:?}", f.backend);
        assert_eq!(
            (record.integration_id.as_deref(), record.key_id.as_deref()),
            (Some("acme"), Some(id))
        );
        assert_eq!(record.before, before, "{}: {change:?}", f.backend);
        assert_eq!(record.after, after, "{}: {change:?}", f.backend);
        assert_eq!(
            watch.published().await,
            vec![key_changed("acme", id)],
            "{}: {change:?}",
            f.backend
        );
        let looked_up = s.integration_key("acme", key.key_id()).await.unwrap().unwrap();
        let after = after.unwrap();
        assert_eq!(looked_up.status, after["status"].as_str().unwrap());
        assert_eq!(looked_up.tier, after["tier"].as_i64().unwrap());
        assert_eq!(looked_up.expires_at.map(text).as_deref(), after["expires_at"].as_str());
        before = Some(after);
    }
    let shown = s.get_integration_key("acme", id).await.unwrap();
    assert_eq!(
        (shown.status.as_str(), shown.tier, shown.expires_at),
        ("active", 4, None)
    );
}

pub async fn a_write_that_fails_records_and_publishes_nothing(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let (_, new) = new_key("acme", 0, None);
    s.create_integration_key(&new).await.unwrap();
    s.create_org("mlab", "ops@example.org", OffsetDateTime::now_utc())
        .await
        .unwrap();
    let audited = s.audit_log(&AuditFilter::default()).await.unwrap().len();
    let missing = |r: Result<(), StoreError>| assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    missing(s.update_integration_key("acme", "ki_missing", KeyChange::Tier(2)).await);
    missing(
        s.update_integration_key("nobody", &new.key_id, KeyChange::Tier(2))
            .await,
    );
    missing(s.delete_integration_key("acme", "ki_missing").await);
    assert!(matches!(
        s.delete_integration("nobody").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(s.delete_org("nobody").await, Err(StoreError::NotFound(_))));
    missing(s.delete_autojoin_key("mlab", "0123456789ab").await);
    missing(s.set_autojoin_expiry("nobody", "0123456789ab", None).await);
    missing(
        s.create_autojoin_key(&NewAutojoinKey::new(
            "nobody",
            &AutojoinApiKey::generate(),
            OffsetDateTime::now_utc(),
            None,
        ))
        .await,
    );
    assert!(matches!(
        s.create_org("mlab", "x@example.org", OffsetDateTime::now_utc()).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.delete_autojoin_key("mlab", "ABC").await,
        Err(StoreError::Config(_))
    ));
    assert!(matches!(
        s.list_integration_keys("nobody").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.list_autojoin_keys("nobody").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.get_integration_key("acme", "ki_missing").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        s.audit_log(&AuditFilter::default()).await.unwrap().len(),
        audited,
        "{}: a failed write left an audit record",
        f.backend
    );
    assert_eq!(watch.published().await, vec![], "{}", f.backend);
}

pub async fn deleting_keys_and_integrations_is_audited_and_published(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let expiry = in_days(3);
    let (one, first) = new_key("acme", 2, Some(expiry));
    s.create_integration_key(&first).await.unwrap();
    s.update_integration_key("acme", &first.key_id, KeyChange::Status("revoked".into()))
        .await
        .unwrap();
    watch.published().await;
    s.delete_integration_key("acme", &first.key_id).await.unwrap();
    let record = audit_of_integration(s, "acme").await.pop().unwrap();
    assert_eq!(record.action, "key delete");
    assert_eq!(record.key_id.as_deref(), Some(first.key_id.as_str()));
    assert_eq!(record.before, state("revoked", 2, Some(&text(expiry))), "{}", f.backend);
    assert_eq!(record.after, None);
    assert_eq!(watch.published().await, vec![key_changed("acme", &first.key_id)]);
    assert_eq!(s.integration_key("acme", one.key_id()).await.unwrap(), None);

    for _ in 0..3 {
        s.create_integration_key(&new_key("acme", 0, None).1).await.unwrap();
    }
    let (_, other) = new_key("other", 0, None);
    s.create_integration_key(&other).await.unwrap();
    assert_eq!(s.delete_integration("acme").await.unwrap(), 3);
    let record = audit_of_integration(s, "acme").await.pop().unwrap();
    assert_eq!(record.action, "integration delete");
    assert_eq!(
        (record.key_id.as_deref(), record.before),
        (None, Some(json!({ "keys": 3 }))),
        "{}",
        f.backend
    );
    assert_eq!(
        watch.published().await,
        vec![Invalidation::Integration {
            integration_id: "acme".into()
        }]
    );
    assert!(matches!(
        s.list_integration_keys("acme").await,
        Err(StoreError::NotFound(_))
    ));
    let left: Vec<String> = s
        .list_integrations()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.integration_id)
        .collect();
    assert_eq!(left, ["other", MARKER]);
    assert!(s.integration_key("other", &other.key_id).await.unwrap().is_some());
}

pub async fn organizations_and_their_keys_are_created_and_looked_up(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let now = OffsetDateTime::now_utc();
    s.create_org("mlab", "ops@example.org", now).await.unwrap();
    let expiry = in_days(10);
    let (lasting, expiring) = (AutojoinApiKey::generate(), AutojoinApiKey::generate());
    s.create_autojoin_key(&NewAutojoinKey::new("mlab", &lasting, now, None))
        .await
        .unwrap();
    s.create_autojoin_key(&NewAutojoinKey::new("mlab", &expiring, now, Some(expiry)))
        .await
        .unwrap();
    let found = s.autojoin_org(&lasting).await.unwrap().unwrap();
    assert_eq!((found.org.as_str(), found.expires_at), ("mlab", None));
    assert_eq!(
        s.autojoin_org(&expiring).await.unwrap().unwrap().expires_at,
        Some(expiry)
    );
    assert_eq!(s.autojoin_org(&AutojoinApiKey::generate()).await.unwrap(), None);

    let records = audit_of_org(s, "mlab").await;
    let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["autojoin create-org", "autojoin create-key", "autojoin create-key"]
    );
    assert_eq!(records[0].after, Some(json!({ "email": "ops@example.org" })));
    assert_eq!(records[2].fingerprint.as_deref(), Some(expiring.fingerprint().as_str()));
    assert_eq!(
        records[2].after,
        Some(json!({ "expires_at": text(expiry) })),
        "{}",
        f.backend
    );
    assert_eq!(watch.published().await, vec![], "{}", f.backend);

    let orgs = s.list_orgs().await.unwrap();
    assert_eq!(orgs.len(), 1);
    assert_eq!(
        (orgs[0].org.as_str(), orgs[0].email.as_str()),
        ("mlab", "ops@example.org")
    );
    assert_eq!(orgs[0].probability_multiplier, Some(1.0));
    let keys = s.list_autojoin_keys("mlab").await.unwrap();
    let mut fingerprints: Vec<&str> = keys.iter().map(|k| k.fingerprint.as_str()).collect();
    fingerprints.sort_unstable();
    let mut expected = [lasting.fingerprint(), expiring.fingerprint()];
    expected.sort_unstable();
    assert_eq!(fingerprints, expected);
}

pub async fn autojoin_keys_change_by_fingerprint(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let now = OffsetDateTime::now_utc();
    s.create_org("mlab", "ops@example.org", now).await.unwrap();
    s.create_org("other", "ops@example.net", now).await.unwrap();
    let key = AutojoinApiKey::generate();
    s.create_autojoin_key(&NewAutojoinKey::new("mlab", &key, now, None))
        .await
        .unwrap();
    let fingerprint = key.fingerprint();
    let expiry = in_days(5);

    s.set_autojoin_expiry("mlab", &fingerprint, Some(expiry)).await.unwrap();
    let record = audit_of_org(s, "mlab").await.pop().unwrap();
    assert_eq!(record.action, "autojoin set-expiry");
    assert_eq!(record.fingerprint.as_deref(), Some(fingerprint.as_str()));
    assert_eq!(record.before, Some(json!({ "expires_at": null })));
    assert_eq!(
        record.after,
        Some(json!({ "expires_at": text(expiry) })),
        "{}",
        f.backend
    );
    assert_eq!(watch.published().await, vec![org_changed("mlab")], "{}", f.backend);
    assert_eq!(s.autojoin_org(&key).await.unwrap().unwrap().expires_at, Some(expiry));
    assert_eq!(
        s.list_autojoin_keys("mlab").await.unwrap()[0].expires_at,
        Some(text(expiry))
    );

    // The fingerprint of another organization's key picks nothing.
    assert!(matches!(
        s.delete_autojoin_key("other", &fingerprint).await,
        Err(StoreError::NotFound(_))
    ));
    // Eight digits are enough to pick it.
    s.delete_autojoin_key("mlab", &fingerprint[..8]).await.unwrap();
    let record = audit_of_org(s, "mlab").await.pop().unwrap();
    assert_eq!(record.action, "autojoin delete-key");
    assert_eq!(record.before, Some(json!({ "expires_at": text(expiry) })));
    assert_eq!(record.after, None);
    assert_eq!(watch.published().await, vec![org_changed("mlab")], "{}", f.backend);
    assert_eq!(s.autojoin_org(&key).await.unwrap(), None);

    for _ in 0..2 {
        s.create_autojoin_key(&NewAutojoinKey::new("mlab", &AutojoinApiKey::generate(), now, None))
            .await
            .unwrap();
    }
    assert_eq!(s.delete_org("mlab").await.unwrap(), 2);
    let record = audit_of_org(s, "mlab").await.pop().unwrap();
    assert_eq!(
        (record.action.as_str(), record.before),
        ("autojoin delete-org", Some(json!({ "keys": 2 })))
    );
    assert_eq!(watch.published().await, vec![org_changed("mlab")], "{}", f.backend);
    assert!(matches!(
        s.list_autojoin_keys("mlab").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.list_orgs().await.unwrap().len(), 1);
}

/// Two keys whose fingerprints share their first eight digits (found by
/// trying: about 80,000 keys for an even chance).
fn colliding_keys() -> (AutojoinApiKey, AutojoinApiKey) {
    let mut seen: HashMap<String, AutojoinApiKey> = HashMap::new();
    for _ in 0..2_000_000 {
        let key = AutojoinApiKey::generate();
        let prefix = key.fingerprint()[..8].to_owned();
        if let Some(first) = seen.remove(&prefix) {
            return (first, key);
        }
        seen.insert(prefix, key);
    }
    panic!("no two fingerprints met");
}

pub async fn an_ambiguous_fingerprint_is_refused(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let now = OffsetDateTime::now_utc();
    s.create_org("mlab", "ops@example.org", now).await.unwrap();
    let (a, b) = tokio::task::spawn_blocking(colliding_keys).await.unwrap();
    s.create_autojoin_key(&NewAutojoinKey::new("mlab", &a, now, None))
        .await
        .unwrap();
    s.create_autojoin_key(&NewAutojoinKey::new("mlab", &b, now, None))
        .await
        .unwrap();
    let audited = audit_of_org(s, "mlab").await.len();
    let prefix = &a.fingerprint()[..8];
    for result in [
        s.delete_autojoin_key("mlab", prefix).await,
        s.set_autojoin_expiry("mlab", prefix, Some(in_days(1))).await,
    ] {
        assert!(
            matches!(&result, Err(StoreError::Ambiguous(m)) if m.starts_with("2 keys")),
            "{}: {result:?}",
            f.backend
        );
    }
    assert!(s.autojoin_org(&a).await.unwrap().is_some() && s.autojoin_org(&b).await.unwrap().is_some());
    assert_eq!(audit_of_org(s, "mlab").await.len(), audited);
    assert_eq!(watch.published().await, vec![]);
    // The whole fingerprint tells them apart.
    s.delete_autojoin_key("mlab", &a.fingerprint()).await.unwrap();
    assert_eq!(s.autojoin_org(&a).await.unwrap(), None);
    assert!(s.autojoin_org(&b).await.unwrap().is_some());
}

pub async fn usage_adds_up_and_keeps_the_later_use(f: &Fixture) {
    let s = &f.store;
    let now = OffsetDateTime::now_utc();
    let (_, new) = new_key("acme", 0, None);
    s.create_integration_key(&new).await.unwrap();
    s.create_org("mlab", "ops@example.org", now).await.unwrap();
    let aj = AutojoinApiKey::generate();
    s.create_autojoin_key(&NewAutojoinKey::new("mlab", &aj, now, None))
        .await
        .unwrap();
    let t = |s: i64| OffsetDateTime::from_unix_timestamp(1_900_000_000 + s).unwrap();
    let integration = UsageKey::Integration {
        integration_id: "acme".into(),
        key_id: new.key_id.clone(),
    };
    let autojoin = UsageKey::Autojoin {
        key_hash: aj.secret().sha256_hex(),
    };
    let usage = |key: &UsageKey, at: i64, tokens: u64| KeyUsage {
        key: key.clone(),
        last_used_at: t(at),
        tokens,
    };
    // Two replicas' flushes, the later use written first; and a key that
    // is gone meanwhile, skipped.
    let gone = UsageKey::Integration {
        integration_id: "acme".into(),
        key_id: "ki_gone".into(),
    };
    s.record_usage(&[usage(&integration, 20, 5), usage(&autojoin, 7, 1), usage(&gone, 1, 9)])
        .await
        .unwrap();
    f.other
        .record_usage(&[usage(&integration, 10, 2), usage(&autojoin, 9, 2)])
        .await
        .unwrap();
    let shown = s.get_integration_key("acme", &new.key_id).await.unwrap();
    assert_eq!(
        (shown.tokens_issued, shown.last_used_at),
        (7, Some(text(t(20)))),
        "{}",
        f.backend
    );
    let shown = &s.list_autojoin_keys("mlab").await.unwrap()[0];
    assert_eq!(
        (shown.tokens_issued, shown.last_used_at.clone()),
        (3, Some(text(t(9)))),
        "{}",
        f.backend
    );
    assert!(matches!(
        s.get_integration_key("acme", "ki_gone").await,
        Err(StoreError::NotFound(_))
    ));
    // Usage is no admin change: nothing audited.
    assert_eq!(audit_of_integration(s, "acme").await.len(), 1);
}

pub async fn the_audit_log_is_in_order_and_filtered(f: &Fixture) {
    let s = &f.store;
    let (_, a) = new_key("alpha", 0, None);
    s.create_integration_key(&a).await.unwrap();
    s.create_org("mlab", "ops@example.org", OffsetDateTime::now_utc())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = OffsetDateTime::now_utc();
    f.other
        .update_integration_key("alpha", &a.key_id, KeyChange::Tier(2))
        .await
        .unwrap();
    let (_, b) = new_key("beta", 0, None);
    s.create_integration_key(&b).await.unwrap();

    let all = audit(s, AuditFilter::default()).await;
    let actions: Vec<&str> = all.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "integration create",
            "autojoin create-org",
            "key set-tier",
            "integration create"
        ],
        "{}",
        f.backend
    );
    assert_eq!(all[2].operator, "other");
    let recent = audit(
        s,
        AuditFilter {
            since: Some(since),
            ..AuditFilter::default()
        },
    )
    .await;
    assert_eq!(recent.len(), 2, "{}: {recent:?}", f.backend);
    assert_eq!(audit_of_integration(s, "alpha").await.len(), 2);
    assert_eq!(audit_of_org(s, "mlab").await.len(), 1);
    for r in &all {
        let text = serde_json::to_string(r).unwrap();
        assert!(!text.contains(&a.key_hash) && !text.contains(&b.key_hash), "{text}");
    }
}

pub async fn lists_are_sorted_and_show_no_secrets(f: &Fixture) {
    let s = &f.store;
    assert!(s.is_empty().await.unwrap());
    assert_eq!(s.list_integrations().await.unwrap(), vec![]);
    let mut ids = Vec::new();
    for integration in ["gamma", "alpha", "beta"] {
        let (_, new) = new_key(integration, 0, None);
        s.create_integration_key(&new).await.unwrap();
    }
    for _ in 0..3 {
        let (_, new) = new_key("alpha", 0, None);
        s.create_integration_key(&new).await.unwrap();
        ids.push(new.key_id);
    }
    let listed: Vec<String> = s
        .list_integrations()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.integration_id)
        .collect();
    assert_eq!(listed, ["alpha", "beta", "gamma"]);
    let keys = s.list_integration_keys("alpha").await.unwrap();
    let listed: Vec<&str> = keys.iter().map(|k| k.key_id.as_str()).collect();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    assert_eq!(listed, sorted);
    assert_eq!(keys.len(), 4);
    assert!(
        keys.iter()
            .all(|k| k.status == "active" && k.tokens_issued == 0 && k.last_used_at.is_none())
    );
    assert_eq!(s.list_integrations().await.unwrap()[0].description, "alpha integration");
}

pub async fn a_feed_starts_at_the_newest_change(f: &Fixture) {
    let s = &f.store;
    let (_, new) = new_key("acme", 0, None);
    s.create_integration_key(&new).await.unwrap();
    for tier in 1..=3 {
        s.update_integration_key("acme", &new.key_id, KeyChange::Tier(tier))
            .await
            .unwrap();
    }
    // A server starting now has nothing cached: earlier changes are not its concern.
    let mut watch = Watch::new(f).await;
    assert_eq!(watch.published().await, vec![], "{}", f.backend);
    s.update_integration_key("acme", &new.key_id, KeyChange::Tier(9))
        .await
        .unwrap();
    assert_eq!(watch.published().await, vec![key_changed("acme", &new.key_id)]);
}

pub async fn a_burst_of_changes_is_read_in_full_and_in_order(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let mut keys = Vec::new();
    for _ in 0..3 {
        let (_, new) = new_key("burst", 0, None);
        s.create_integration_key(&new).await.unwrap();
        keys.push(new.key_id);
    }
    // More than a page of any backend's feed, from two admin handles.
    let burst = 600;
    let mut expected = Vec::new();
    for i in 0..burst {
        let key = &keys[i % keys.len()];
        let store = if i % 2 == 0 { s } else { &f.other };
        store
            .update_integration_key("burst", key, KeyChange::Tier(i as i64))
            .await
            .unwrap();
        expected.push(key_changed("burst", key));
    }
    let read = watch.published().await;
    assert_eq!(read.len(), burst, "{}: {} read", f.backend, read.len());
    assert!(read == expected, "{}: read out of order or with gaps", f.backend);
}

pub async fn two_writers_on_one_row_both_take_effect(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let (key, new) = new_key("race", 0, None);
    s.create_integration_key(&new).await.unwrap();
    for round in 1..=5_i64 {
        // One operator revokes while another re-tiers: neither may write
        // back what the other replaced.
        let (revoke, tier) = tokio::join!(
            s.update_integration_key("race", &new.key_id, KeyChange::Status("revoked".into())),
            f.other
                .update_integration_key("race", &new.key_id, KeyChange::Tier(round)),
        );
        revoke.unwrap();
        tier.unwrap();
        let record = s.integration_key("race", key.key_id()).await.unwrap().unwrap();
        assert_eq!(
            (record.status.as_str(), record.tier),
            ("revoked", round),
            "{}: round {round}",
            f.backend
        );
        let published = watch.published().await;
        assert_eq!(published, vec![key_changed("race", &new.key_id); 2], "{}", f.backend);
        s.update_integration_key("race", &new.key_id, KeyChange::Status("active".into()))
            .await
            .unwrap();
        watch.published().await;
    }
    // Every write is audited, and each record's "before" is what the
    // other writer left: the records chain.
    let records = audit_of_integration(s, "race").await;
    assert_eq!(records.len(), 1 + 5 * 3);
    for pair in records.windows(2).skip(1) {
        assert_eq!(pair[1].before, pair[0].after, "{}: {pair:?}", f.backend);
    }
}

pub async fn a_restored_store_is_noticed_by_the_feed(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let (_, new) = new_key("restore", 0, None);
    s.create_integration_key(&new).await.unwrap();
    // A backup of a store that has published.
    s.update_integration_key("restore", &new.key_id, KeyChange::Tier(1))
        .await
        .unwrap();
    watch.published().await;
    if !f.accidents.back_up().await {
        eprintln!("{}: no feed position a restore could move", f.backend);
        return;
    }
    // Changes after the backup, read...
    for tier in 2..=3 {
        s.update_integration_key("restore", &new.key_id, KeyChange::Tier(tier))
            .await
            .unwrap();
    }
    assert_eq!(watch.published().await.len(), 2);
    // ...then the backup put back, and changes made on it: the feed cannot
    // know what changed, and says so.
    f.accidents.restore().await;
    s.update_integration_key("restore", &new.key_id, KeyChange::Tier(5))
        .await
        .unwrap();
    let read = watch.published().await;
    assert!(
        read.contains(&Invalidation::Everything),
        "{}: the restore went unnoticed: {read:?}",
        f.backend
    );
    // And it follows changes again.
    s.update_integration_key("restore", &new.key_id, KeyChange::Tier(6))
        .await
        .unwrap();
    assert_eq!(
        watch.published().await,
        vec![key_changed("restore", &new.key_id)],
        "{}",
        f.backend
    );
}

pub async fn an_outage_is_reported_and_the_feed_recovers(f: &Fixture) {
    let mut watch = Watch::new(f).await;
    let s = &f.store;
    let (_, new) = new_key("outage", 0, None);
    s.create_integration_key(&new).await.unwrap();
    if !f.accidents.set_down(true).await {
        eprintln!("{}: cannot be put out of service here", f.backend);
        return;
    }
    let failed = tokio::time::timeout(DEADLINE, watch.feed.next())
        .await
        .expect("a read gives up");
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{}: {failed:?}",
        f.backend
    );
    assert!(matches!(
        s.integration_key("outage", &new.key_id).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(s.ping().await.is_err());
    assert!(s.autojoin_org(&AutojoinApiKey::generate()).await.is_err());
    f.accidents.set_down(false).await;
    // Changes during the outage cannot be known: the first read after it
    // reports everything, once, and the feed follows again.
    s.update_integration_key("outage", &new.key_id, KeyChange::Tier(3))
        .await
        .unwrap();
    let read = watch.published().await;
    assert_eq!(read.first(), Some(&Invalidation::Everything), "{}: {read:?}", f.backend);
    assert_eq!(&read[1..], [key_changed("outage", &new.key_id)]);
    assert_eq!(watch.feed.recoveries(), 1);
    s.update_integration_key("outage", &new.key_id, KeyChange::Tier(4))
        .await
        .unwrap();
    assert_eq!(watch.published().await, vec![key_changed("outage", &new.key_id)]);
}
