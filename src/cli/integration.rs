//! `integration`: create, list, show and delete client integrations.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::admin::{cell, create_integration_key, open, print_table};
use crate::config::{ExpiryArgs, ListArgs, StoreArgs, from_now, parse_duration, parse_instant};
use crate::store;
use crate::store::rfc3339;

#[derive(Debug, Subcommand)]
pub enum IntegrationCommand {
    /// Create a key for an integration, creating the integration if needed.
    /// Prints the API key; it cannot be shown again.
    Create(IntegrationCreateArgs),
    /// List the integrations (or, with --unused-for, the keys not used lately).
    List(IntegrationListArgs),
    /// Show an integration's keys (never their secrets or hashes).
    Show(IntegrationRef),
    /// Delete an integration and all its keys.
    Delete(IntegrationRef),
}

#[derive(Debug, Clone, Args)]
pub struct IntegrationListArgs {
    #[command(flatten)]
    pub list: ListArgs,
    /// List instead every key that issued no token for this long (`30d`);
    /// a key never used counts from its creation.
    #[arg(long, value_parser = parse_duration)]
    pub unused_for: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
pub struct IntegrationRef {
    /// Integration ID, without the `cii_` prefix.
    #[arg(long)]
    pub integration_id: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct IntegrationCreateArgs {
    /// Integration ID, without the `cii_` prefix.
    #[arg(long)]
    pub integration_id: String,
    /// Key ID, with its `ki_` prefix [default: random].
    #[arg(long)]
    pub key_id: Option<String>,
    /// Service tier of the key, in the `tier` claim.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
    pub tier: i64,
    /// Description of the integration (used only when it is created).
    #[arg(long, default_value = "")]
    pub integration_description: String,
    /// Description of the key.
    #[arg(long, default_value = "")]
    pub key_description: String,
    #[command(flatten)]
    pub expiry: ExpiryArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
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

pub(super) async fn integration_list(list_args: &IntegrationListArgs) -> anyhow::Result<()> {
    if let Some(unused_for) = list_args.unused_for {
        return unused_keys(&list_args.list, unused_for).await;
    }
    let args = &list_args.list;
    let list = open(&args.store).await?.list_integrations().await?;
    if args.json {
        println!("{}", json!({ "integrations": list }));
    } else if list.is_empty() {
        println!("No integrations.");
    } else {
        let rows: Vec<Vec<String>> = list
            .into_iter()
            .map(|i| vec![i.integration_id, i.created_at, i.description])
            .collect();
        print_table(&["INTEGRATION", "CREATED", "DESCRIPTION"], &rows);
    }
    Ok(())
}

/// Keys that issued no token for `unused_for` (counting from creation for
/// keys never used): the candidates to retire.
async fn unused_keys(args: &ListArgs, unused_for: std::time::Duration) -> anyhow::Result<()> {
    let store = open(&args.store).await?;
    let cutoff = rfc3339(from_now(unused_for, false).map_err(|e| anyhow::anyhow!("--unused-for: {e}"))?);
    let mut unused = Vec::new();
    for integration in store.list_integrations().await? {
        for key in store.list_integration_keys(&integration.integration_id).await? {
            // RFC 3339 in UTC compares as text only at equal precision, so
            // compare instants.
            let last = key.last_used_at.as_deref().unwrap_or(&key.created_at);
            let idle = match (parse_instant(last), parse_instant(&cutoff)) {
                (Ok(last), Ok(cutoff)) => last < cutoff,
                _ => true,
            };
            if idle {
                unused.push((integration.integration_id.clone(), key));
            }
        }
    }
    if args.json {
        let keys: Vec<_> = unused
            .iter()
            .map(|(id, k)| {
                json!({
                    "integration_id": id,
                    "key_id": k.key_id,
                    "status": k.status,
                    "created_at": k.created_at,
                    "last_used_at": k.last_used_at,
                    "tokens_issued": k.tokens_issued,
                })
            })
            .collect();
        println!("{}", json!({ "unused_keys": keys, "since": cutoff }));
    } else if unused.is_empty() {
        println!("Every key issued a token since {cutoff}.");
    } else {
        let rows: Vec<Vec<String>> = unused
            .into_iter()
            .map(|(id, k)| vec![id, k.key_id, k.status, cell(k.last_used_at.as_deref()), k.created_at])
            .collect();
        print_table(&["INTEGRATION", "KEY", "STATUS", "LAST USED", "CREATED"], &rows);
    }
    Ok(())
}

pub(super) async fn integration_show(args: &IntegrationRef) -> anyhow::Result<()> {
    let keys = open(&args.store)
        .await?
        .list_integration_keys(&args.integration_id)
        .await?;
    if args.json {
        println!("{}", json!({ "integration_id": args.integration_id, "keys": keys }));
    } else if keys.is_empty() {
        println!("Integration {} has no keys.", args.integration_id);
    } else {
        let rows: Vec<Vec<String>> = keys
            .into_iter()
            .map(|k| {
                vec![
                    k.key_id,
                    k.status,
                    k.tier.to_string(),
                    k.created_at,
                    cell(k.expires_at.as_deref()),
                    cell(k.last_used_at.as_deref()),
                    k.tokens_issued.to_string(),
                    k.description,
                ]
            })
            .collect();
        print_table(
            &[
                "KEY",
                "STATUS",
                "TIER",
                "CREATED",
                "EXPIRES",
                "LAST USED",
                "TOKENS",
                "DESCRIPTION",
            ],
            &rows,
        );
    }
    Ok(())
}

pub(super) async fn integration_delete(args: &IntegrationRef) -> anyhow::Result<()> {
    let deleted = open(&args.store)
        .await?
        .delete_integration(&args.integration_id)
        .await?;
    if args.json {
        println!(
            "{}",
            json!({ "integration_id": args.integration_id, "deleted_keys": deleted })
        );
    } else {
        println!("Deleted integration {} and its {deleted} key(s).", args.integration_id);
    }
    Ok(())
}
