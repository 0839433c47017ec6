//! `audit`: the log of admin changes.

use clap::{Args, Subcommand};
use serde_json::json;

use super::admin::{open, print_table};
use crate::config::{StoreArgs, from_now, parse_duration, parse_instant};
use crate::store::AuditFilter;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit records, oldest first: who changed which key, from what
    /// to what (never a secret).
    List(AuditListArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AuditListArgs {
    /// Only records from this time on: RFC 3339 (`2026-11-01T00:00:00Z`)
    /// or a duration ago (`24h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records about this integration.
    #[arg(long)]
    pub integration_id: Option<String>,
    /// Only records about this autojoin organization.
    #[arg(long)]
    pub org: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
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
