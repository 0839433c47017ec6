//! Admin subcommands that create integrations, organizations and keys.
//!
//! Each prints a newly created key exactly once: on stdout, as text or (with
//! `--json`) as one JSON object and nothing else, so scripts can capture it.

use anyhow::Context as _;
use serde_json::json;
use time::OffsetDateTime;

use crate::api_key::{self, AutojoinApiKey, IntegrationApiKey, KEY_ID_PREFIX};
use crate::config::{CreateAutojoinKeyArgs, CreateOrgArgs, IntegrationCreateArgs, StoreArgs};
use crate::store::{self, NewAutojoinKey, NewIntegrationKey, Store};

/// Opens the store and says which one on stderr (stdout carries only the
/// command's result): with Datastore as the default, an operator must see
/// at once whether a command reached production, the emulator or a file.
pub(super) async fn open(args: &StoreArgs) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    let location = store::locate(&args.settings())?;
    let store = store::open(args).await?;
    eprintln!("store: {location}");
    Ok(store)
}

fn check_key_id(key_id: &str) -> anyhow::Result<()> {
    let suffix = key_id
        .strip_prefix(KEY_ID_PREFIX)
        .with_context(|| format!("--key-id must start with {KEY_ID_PREFIX:?}"))?;
    api_key::check_new_id(suffix, api_key::MAX_KEY_ID_LEN - KEY_ID_PREFIX.len())
        .map_err(|why| anyhow::anyhow!("--key-id after {KEY_ID_PREFIX:?} {why}"))
}

/// Creates a key for an integration (and the integration if needed).
pub async fn create_integration_key(
    store: &dyn Store,
    integration_id: &str,
    key_id: Option<&str>,
    tier: i64,
    integration_description: &str,
    key_description: &str,
    expires_at: Option<OffsetDateTime>,
) -> anyhow::Result<(IntegrationApiKey, bool)> {
    api_key::check_new_id(integration_id, api_key::MAX_INTEGRATION_ID_LEN)
        .map_err(|why| anyhow::anyhow!("--integration-id {why}"))?;
    if let Some(id) = key_id {
        check_key_id(id)?;
    }
    let key = IntegrationApiKey::generate(integration_id, key_id);
    let created = store
        .create_integration_key(&NewIntegrationKey {
            integration_id: integration_id.to_owned(),
            integration_description: integration_description.to_owned(),
            key_id: key.key_id().to_owned(),
            key_hash: key.secret().sha256_hex(),
            key_description: key_description.to_owned(),
            tier,
            created_at: OffsetDateTime::now_utc(),
            expires_at,
            replaces: None,
        })
        .await?;
    Ok((key, created))
}

pub(super) async fn integration_create(args: &IntegrationCreateArgs) -> anyhow::Result<()> {
    let expires_at = args.expiry.expiry().map_err(anyhow::Error::msg)?;
    let store = open(&args.store).await?;
    let (key, created) = create_integration_key(
        store.as_ref(),
        &args.integration_id,
        args.key_id.as_deref(),
        args.tier,
        &args.integration_description,
        &args.key_description,
        expires_at,
    )
    .await?;
    let api_key = key.to_secret_string();
    if args.json {
        let mut out = json!({
            "integration_id": key.integration_id(),
            "key_id": key.key_id(),
            "api_key": api_key.expose(),
        });
        if let Some(at) = expires_at {
            out["expires_at"] = json!(store::rfc3339(at));
        }
        println!("{out}");
    } else {
        if created {
            println!("Created integration {}.", key.integration_id());
        }
        println!(
            "Created key {} (tier {}) for integration {}.",
            key.key_id(),
            args.tier,
            key.integration_id()
        );
        if let Some(at) = expires_at {
            println!("It expires at {}.", store::rfc3339(at));
        }
        println!("API key (shown only now; store it securely):");
        println!("{}", api_key.expose());
    }
    Ok(())
}

pub(super) async fn autojoin_create_org(args: &CreateOrgArgs) -> anyhow::Result<()> {
    api_key::check_new_id(&args.org, 128).map_err(|why| anyhow::anyhow!("--org {why}"))?;
    if !args.email.contains('@') {
        anyhow::bail!("--email {:?} is not an email address", args.email);
    }
    let store = open(&args.store).await?;
    store
        .create_org(&args.org, &args.email, OffsetDateTime::now_utc())
        .await?;
    if args.json {
        println!("{}", json!({ "org": args.org, "email": args.email }));
    } else {
        println!("Created organization {}.", args.org);
    }
    Ok(())
}

/// Creates an autojoin key for an existing organization.
pub async fn create_autojoin_key(
    store: &dyn Store,
    org: &str,
    expires_at: Option<OffsetDateTime>,
) -> anyhow::Result<AutojoinApiKey> {
    let key = AutojoinApiKey::generate();
    store
        .create_autojoin_key(&NewAutojoinKey::new(org, &key, OffsetDateTime::now_utc(), expires_at))
        .await?;
    Ok(key)
}

pub(super) async fn autojoin_create_key(create: &CreateAutojoinKeyArgs) -> anyhow::Result<()> {
    let expires_at = create.expiry.expiry().map_err(anyhow::Error::msg)?;
    let args = &create.org;
    let store = open(&args.store).await?;
    let key = create_autojoin_key(store.as_ref(), &args.org, expires_at).await?;
    if args.json {
        let mut out = json!({ "org": args.org, "api_key": key.secret().expose() });
        if let Some(at) = expires_at {
            out["expires_at"] = json!(store::rfc3339(at));
        }
        println!("{out}");
    } else {
        println!(
            "Created a key (fingerprint {}) for organization {}.",
            key.fingerprint(),
            args.org
        );
        println!("API key (shown only now; store it securely):");
        println!("{}", key.secret().expose());
    }
    Ok(())
}
