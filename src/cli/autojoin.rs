//! `autojoin`: organizations and their keys.

use clap::{Args, Subcommand};
use serde_json::json;
use time::OffsetDateTime;

use super::admin::{cell, create_autojoin_key, open, print_table};
use crate::api_key;
use crate::config::{ExpiryArgs, ListArgs, NewExpiryArgs, StoreArgs};
use crate::store;
use crate::store::rfc3339;

#[derive(Debug, Subcommand)]
pub enum AutojoinCommand {
    /// Create an autojoin organization.
    CreateOrg(CreateOrgArgs),
    /// Create an API key for an existing organization. Prints the key; it
    /// cannot be shown again.
    CreateKey(CreateAutojoinKeyArgs),
    /// List the organizations.
    ListOrgs(ListArgs),
    /// List an organization's keys, by fingerprint (never the key).
    ListKeys(OrgRef),
    /// Delete one key of an organization, named by its fingerprint.
    DeleteKey(DeleteAutojoinKeyArgs),
    /// Set when a key of an organization expires, or (`--never`) that it
    /// does not.
    SetExpiry(SetAutojoinExpiryArgs),
    /// Delete an organization and all its keys.
    DeleteOrg(OrgRef),
}

#[derive(Debug, Clone, Args)]
pub struct OrgRef {
    /// Organization name.
    #[arg(long)]
    pub org: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct CreateAutojoinKeyArgs {
    #[command(flatten)]
    pub org: OrgRef,
    #[command(flatten)]
    pub expiry: ExpiryArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SetAutojoinExpiryArgs {
    #[command(flatten)]
    pub org: OrgRef,
    /// The key's fingerprint as `autojoin list-keys` shows it.
    #[arg(long)]
    pub fingerprint: String,
    #[command(flatten)]
    pub expiry: NewExpiryArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DeleteAutojoinKeyArgs {
    #[command(flatten)]
    pub org: OrgRef,
    /// The key's fingerprint as `autojoin list-keys` shows it (at least 8
    /// hex digits).
    #[arg(long)]
    pub fingerprint: String,
}

#[derive(Debug, Clone, Args)]
pub struct CreateOrgArgs {
    /// Organization name (also the `org` claim).
    #[arg(long)]
    pub org: String,
    /// Contact address of the organization.
    #[arg(long)]
    pub email: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
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

pub(super) async fn autojoin_list_orgs(args: &ListArgs) -> anyhow::Result<()> {
    let orgs = open(&args.store).await?.list_orgs().await?;
    if args.json {
        println!("{}", json!({ "organizations": orgs }));
    } else if orgs.is_empty() {
        println!("No organizations.");
    } else {
        let rows: Vec<Vec<String>> = orgs
            .into_iter()
            .map(|o| {
                let multiplier = o
                    .probability_multiplier
                    .map_or_else(|| "-".to_owned(), |m| m.to_string());
                vec![o.org, o.email, o.created_at, multiplier]
            })
            .collect();
        print_table(&["ORGANIZATION", "EMAIL", "CREATED", "PROBABILITY"], &rows);
    }
    Ok(())
}

pub(super) async fn autojoin_list_keys(args: &OrgRef) -> anyhow::Result<()> {
    let keys = open(&args.store).await?.list_autojoin_keys(&args.org).await?;
    if args.json {
        println!("{}", json!({ "org": args.org, "keys": keys }));
    } else if keys.is_empty() {
        println!("Organization {} has no keys.", args.org);
    } else {
        let rows: Vec<Vec<String>> = keys
            .into_iter()
            .map(|k| {
                vec![
                    k.fingerprint,
                    k.created_at,
                    cell(k.expires_at.as_deref()),
                    cell(k.last_used_at.as_deref()),
                    k.tokens_issued.to_string(),
                ]
            })
            .collect();
        print_table(&["FINGERPRINT", "CREATED", "EXPIRES", "LAST USED", "TOKENS"], &rows);
    }
    Ok(())
}

pub(super) async fn autojoin_delete_key(args: &DeleteAutojoinKeyArgs) -> anyhow::Result<()> {
    let org = &args.org;
    open(&org.store)
        .await?
        .delete_autojoin_key(&org.org, &args.fingerprint)
        .await?;
    if org.json {
        println!(
            "{}",
            json!({ "org": org.org, "fingerprint": args.fingerprint, "deleted": true })
        );
    } else {
        println!("Deleted the key {} of organization {}.", args.fingerprint, org.org);
    }
    Ok(())
}

pub(super) async fn autojoin_delete_org(args: &OrgRef) -> anyhow::Result<()> {
    let deleted = open(&args.store).await?.delete_org(&args.org).await?;
    if args.json {
        println!("{}", json!({ "org": args.org, "deleted_keys": deleted }));
    } else {
        println!("Deleted organization {} and its {deleted} key(s).", args.org);
    }
    Ok(())
}

pub(super) async fn autojoin_set_expiry(args: &SetAutojoinExpiryArgs) -> anyhow::Result<()> {
    let org = &args.org;
    let expires_at = args.expiry.expiry().map_err(anyhow::Error::msg)?;
    open(&org.store)
        .await?
        .set_autojoin_expiry(&org.org, &args.fingerprint, expires_at)
        .await?;
    let expires_at = expires_at.map(rfc3339);
    if org.json {
        println!(
            "{}",
            json!({ "org": org.org, "fingerprint": args.fingerprint, "expires_at": expires_at })
        );
    } else {
        match expires_at {
            Some(at) => println!(
                "The key {} of organization {} now expires at {at}.",
                args.fingerprint, org.org
            ),
            None => println!(
                "The key {} of organization {} now never expires.",
                args.fingerprint, org.org
            ),
        }
    }
    Ok(())
}
