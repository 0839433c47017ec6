//! Admin commands that list, change and delete what exists. Each one that
//! names something missing fails with a message and changes nothing.

use serde_json::json;

use time::OffsetDateTime;

use super::admin::open;
use crate::api_key::IntegrationApiKey;
use crate::config::{
    AuditListArgs, DeleteAutojoinKeyArgs, IntegrationListArgs, IntegrationRef, KeyCommand, KeyRef, ListArgs, OrgRef,
    SetAutojoinExpiryArgs, SetKeyExpiryArgs, SetTierArgs, from_now, parse_duration, parse_instant,
};
use crate::store::{AuditFilter, KeyChange, NewIntegrationKey, STATUS_ACTIVE, STATUS_REVOKED, rfc3339};

/// An optional time as a table cell.
fn cell(t: Option<&str>) -> String {
    t.unwrap_or("-").to_owned()
}

/// A cell as printed: control characters (a newline in a description, an
/// escape sequence in an e-mail) are shown escaped, so stored text cannot
/// forge rows or rewrite the terminal.
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Prints rows under headers, each column as wide as its widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| printable(c)).collect())
        .collect();
    let rows = rows.as_slice();
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

pub(super) async fn audit_list(args: &AuditListArgs) -> anyhow::Result<()> {
    let since = match args.since.as_deref() {
        None => None,
        Some(text) => Some(match parse_instant(text) {
            Ok(at) => at,
            Err(_) => {
                let ago = parse_duration(text)
                    .map_err(|_| anyhow::anyhow!("--since {text:?} is neither an RFC 3339 time nor a duration"))?;
                from_now(ago, false).map_err(|e| anyhow::anyhow!("--since: {e}"))?
            }
        }),
    };
    let filter = AuditFilter {
        since,
        integration_id: args.integration_id.clone(),
        org: args.org.clone(),
    };
    let records = open(&args.store).await?.audit_log(&filter).await?;
    if args.json {
        println!("{}", json!({ "records": records }));
    } else if records.is_empty() {
        println!("No audit records.");
    } else {
        let text = |v: &Option<serde_json::Value>| v.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string);
        let rows: Vec<Vec<String>> = records
            .iter()
            .map(|r| {
                let subject = match (&r.integration_id, &r.key_id, &r.org, &r.fingerprint) {
                    (Some(i), Some(k), _, _) => format!("{i}/{k}"),
                    (Some(i), None, _, _) => i.clone(),
                    (_, _, Some(o), Some(f)) => format!("{o}/{f}"),
                    (_, _, Some(o), None) => o.clone(),
                    _ => "-".to_owned(),
                };
                vec![
                    r.at.clone(),
                    r.operator.clone(),
                    r.action.clone(),
                    subject,
                    text(&r.before),
                    text(&r.after),
                ]
            })
            .collect();
        print_table(&["TIME", "OPERATOR", "ACTION", "SUBJECT", "BEFORE", "AFTER"], &rows);
    }
    Ok(())
}
