//! What the admin subcommands share: opening the store (and saying which),
//! creating keys (also for `serve --dev`), and printing tables.
//!
//! A command that creates a key prints it exactly once: on stdout, as text or
//! (with `--json`) as one JSON object and nothing else, so scripts can
//! capture it. A command that names something missing fails with a message
//! and changes nothing.

use anyhow::Context as _;
use time::OffsetDateTime;

use crate::api_key::{self, AutojoinApiKey, IntegrationApiKey, KEY_ID_PREFIX};
use crate::config::StoreArgs;
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

pub(super) fn check_key_id(key_id: &str) -> anyhow::Result<()> {
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

/// An optional time as a table cell.
pub(super) fn cell(t: Option<&str>) -> String {
    t.unwrap_or("-").to_owned()
}

/// A cell as printed: control characters (a newline in a description, an
/// escape sequence in an e-mail) are shown escaped, so stored text cannot
/// forge rows or rewrite the terminal.
pub(super) fn printable(text: &str) -> String {
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
pub(super) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
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
