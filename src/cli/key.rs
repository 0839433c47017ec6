//! `key`: revoke, re-activate, re-tier, set the expiry of, rotate or delete
//! one integration key.

use clap::{Args, Subcommand};
use serde_json::json;
use time::OffsetDateTime;

use super::admin::open;
use crate::api_key::IntegrationApiKey;
use crate::config::{NewExpiryArgs, StoreArgs, parse_instant};
use crate::store::{KeyChange, NewIntegrationKey, STATUS_ACTIVE, STATUS_REVOKED, rfc3339};

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Refuse the key from now on (within the servers' cache TTL).
    Revoke(KeyRef),
    /// Accept a revoked key again.
    Activate(KeyRef),
    /// Change the key's tier (the `tier` claim).
    SetTier(SetTierArgs),
    /// Set when the key expires, or (`--never`) that it does not.
    SetExpiry(SetKeyExpiryArgs),
    /// Delete the key.
    Delete(KeyRef),
    /// Create a new active key with the same tier and description, and print
    /// it once. The old key stays active until revoked, so the customer can
    /// switch over.
    Rotate(KeyRef),
}

#[derive(Debug, Clone, Args)]
pub struct KeyRef {
    /// Integration ID, without the `cii_` prefix.
    #[arg(long)]
    pub integration_id: String,
    /// Key ID, with its `ki_` prefix.
    #[arg(long)]
    pub key_id: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SetKeyExpiryArgs {
    #[command(flatten)]
    pub key: KeyRef,
    #[command(flatten)]
    pub expiry: NewExpiryArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SetTierArgs {
    #[command(flatten)]
    pub key: KeyRef,
    /// The new tier.
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    pub tier: i64,
}

pub(super) async fn key(command: &KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Revoke(k) => set_status(k, STATUS_REVOKED).await,
        KeyCommand::Activate(k) => set_status(k, STATUS_ACTIVE).await,
        KeyCommand::SetTier(args) => set_tier(args).await,
        KeyCommand::SetExpiry(args) => set_key_expiry(args).await,
        KeyCommand::Delete(k) => delete_key(k).await,
        KeyCommand::Rotate(k) => rotate(k).await,
    }
}

async fn set_status(k: &KeyRef, status: &str) -> anyhow::Result<()> {
    open(&k.store)
        .await?
        .update_integration_key(&k.integration_id, &k.key_id, KeyChange::Status(status.to_owned()))
        .await?;
    if k.json {
        println!(
            "{}",
            json!({ "integration_id": k.integration_id, "key_id": k.key_id, "status": status })
        );
    } else {
        println!("Key {} of integration {} is now {status}.", k.key_id, k.integration_id);
        if status == STATUS_REVOKED {
            println!(
                "Running servers refuse it within about a second (a server that cannot read published \
                 changes: within --key-cache-ttl, 30 s by default)."
            );
        }
    }
    Ok(())
}

async fn set_tier(args: &SetTierArgs) -> anyhow::Result<()> {
    let k = &args.key;
    open(&k.store)
        .await?
        .update_integration_key(&k.integration_id, &k.key_id, KeyChange::Tier(args.tier))
        .await?;
    if k.json {
        println!(
            "{}",
            json!({ "integration_id": k.integration_id, "key_id": k.key_id, "tier": args.tier })
        );
    } else {
        println!(
            "Key {} of integration {} now has tier {}.",
            k.key_id, k.integration_id, args.tier
        );
    }
    Ok(())
}

async fn set_key_expiry(args: &SetKeyExpiryArgs) -> anyhow::Result<()> {
    let k = &args.key;
    let expires_at = args.expiry.expiry().map_err(anyhow::Error::msg)?;
    open(&k.store)
        .await?
        .update_integration_key(&k.integration_id, &k.key_id, KeyChange::Expiry(expires_at))
        .await?;
    let expires_at = expires_at.map(rfc3339);
    if k.json {
        println!(
            "{}",
            json!({ "integration_id": k.integration_id, "key_id": k.key_id, "expires_at": expires_at })
        );
    } else {
        match expires_at {
            Some(at) => println!(
                "Key {} of integration {} now expires at {at}.",
                k.key_id, k.integration_id
            ),
            None => println!(
                "Key {} of integration {} now never expires.",
                k.key_id, k.integration_id
            ),
        }
    }
    Ok(())
}

async fn delete_key(k: &KeyRef) -> anyhow::Result<()> {
    open(&k.store)
        .await?
        .delete_integration_key(&k.integration_id, &k.key_id)
        .await?;
    if k.json {
        println!(
            "{}",
            json!({ "integration_id": k.integration_id, "key_id": k.key_id, "deleted": true })
        );
    } else {
        println!("Deleted key {} of integration {}.", k.key_id, k.integration_id);
    }
    Ok(())
}

async fn rotate(k: &KeyRef) -> anyhow::Result<()> {
    let store = open(&k.store).await?;
    let old = store.get_integration_key(&k.integration_id, &k.key_id).await?;
    // The replacement expires when the old key does.
    let expires_at = old
        .expires_at
        .as_deref()
        .map(parse_instant)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let new = IntegrationApiKey::generate(&k.integration_id, None);
    store
        .create_integration_key(&NewIntegrationKey {
            integration_id: k.integration_id.clone(),
            integration_description: String::new(),
            key_id: new.key_id().to_owned(),
            key_hash: new.secret().sha256_hex(),
            key_description: old.description.clone(),
            tier: old.tier,
            created_at: OffsetDateTime::now_utc(),
            expires_at,
            replaces: Some(k.key_id.clone()),
        })
        .await?;
    let api_key = new.to_secret_string();
    if k.json {
        println!(
            "{}",
            json!({
                "integration_id": k.integration_id,
                "key_id": new.key_id(),
                "api_key": api_key.expose(),
                "replaces": k.key_id,
            })
        );
    } else {
        println!(
            "Created key {} (tier {}) to replace {} of integration {}.",
            new.key_id(),
            old.tier,
            k.key_id,
            k.integration_id
        );
        println!("{} stays {} until you revoke it.", k.key_id, old.status);
        println!("API key (shown only now; store it securely):");
        println!("{}", api_key.expose());
    }
    Ok(())
}
