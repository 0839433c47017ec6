//! Admin commands that list, change and delete what exists. Each one that
//! names something missing fails with a message and changes nothing.

use serde_json::json;

use super::admin::{create_integration_key, open};
use crate::config::{DeleteAutojoinKeyArgs, IntegrationRef, KeyCommand, KeyRef, ListArgs, OrgRef, SetTierArgs};
use crate::store::{KeyChange, STATUS_ACTIVE, STATUS_REVOKED};

/// Prints rows under headers, each column as wide as its widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub(super) async fn integration_list(args: &ListArgs) -> anyhow::Result<()> {
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
            .map(|k| vec![k.key_id, k.status, k.tier.to_string(), k.created_at, k.description])
            .collect();
        print_table(&["KEY", "STATUS", "TIER", "CREATED", "DESCRIPTION"], &rows);
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

pub(super) async fn key(command: &KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Revoke(k) => set_status(k, STATUS_REVOKED).await,
        KeyCommand::Activate(k) => set_status(k, STATUS_ACTIVE).await,
        KeyCommand::SetTier(args) => set_tier(args).await,
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
    let (new, _) =
        create_integration_key(store.as_ref(), &k.integration_id, None, old.tier, "", &old.description).await?;
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
        let rows: Vec<Vec<String>> = keys.into_iter().map(|k| vec![k.fingerprint, k.created_at]).collect();
        print_table(&["FINGERPRINT", "CREATED"], &rows);
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
