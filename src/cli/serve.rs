//! `serve`: the HTTP server, and its zero-setup development mode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use crate::app::{Application, ListenAddress, shutdown_signal};
use crate::background::Background;
use crate::config::{DEFAULT_PRIVATE_KEY_PATH, ServeArgs};
use crate::http::AppState;
use crate::rotation::{self, KeySource};
use crate::signing::{Algorithm, SigningKey, write_private_jwk};
use crate::store::{self, Store};

pub(super) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let private = if args.dev {
        dev_signing_key_path(&args)?
    } else {
        args.private_key_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PRIVATE_KEY_PATH))
    };
    let source = KeySource {
        private,
        public: args.public_key_path.clone(),
    };
    let keys = source.load()?;

    let mut store_args = args.store.clone();
    if args.dev && store_args.store.is_none() {
        create_private_dir(&args.data_dir)?;
        let path = args.data_dir.join("token-exchange.db");
        store_args.store = Some(format!("sqlite:{}", path.display()));
    }
    let location = store::locate(&store_args.settings())?;
    let store = store::open(&store_args).await?;
    let demo = if args.dev {
        Some(dev_demo_keys(store.as_ref(), &args.data_dir).await?)
    } else {
        None
    };

    let alg = keys.active().alg().as_str();
    let active_kid = keys.active().kid().to_owned();
    let published: Vec<String> = keys.kids().into_iter().map(str::to_owned).collect();
    let feed = store.change_feed(args.changes_poll_interval);
    let usage_store: Arc<dyn store::Admin> = store.clone();
    let state = AppState::new(Arc::new(keys), store, args.settings());
    let mut background = Background::new(state.metrics.clone());
    background.spawn(
        "change_feed_follower",
        crate::invalidation::follow(feed, state.validator.cache().clone(), state.metrics.clone()),
    );
    background.spawn(
        "key_reloader",
        rotation::watch(
            source,
            state.keys.clone(),
            state.metrics.clone(),
            args.key_reload_interval,
        ),
    );
    background.spawn(
        "usage_writer",
        crate::usage::flush_every(
            state.usage.clone(),
            usage_store.clone(),
            args.usage_flush_interval.max(std::time::Duration::from_millis(100)),
            args.store.store_timeout * 2,
        ),
    );
    let stopper = background.stopper();
    let bind = |at: ListenAddress| async move { at.bind().await.with_context(|| format!("cannot listen on {at}")) };
    let api = bind(args.listen_addr()).await?;
    let metrics = bind(args.metrics_addr()).await?;
    let state_usage = state.usage.clone();
    let app = Application::with_listeners(api, metrics, state);
    // Before saying where we listen: from then on, a stop signal must stop
    // the server gracefully.
    let signal = shutdown_signal();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            () = signal => {}
            name = background.ended() => {
                let _ = ended_tx.send(name);
            }
        }
    };
    // One line that says what runs: an operator (or a test) reads here
    // which store and key this replica uses.
    tracing::info!(
        addr = %app.local_addr(),
        metrics_addr = %app.metrics_addr(),
        store = %location,
        alg,
        active_kid,
        published = ?published,
        "listening"
    );
    if let Some(demo) = demo {
        print_dev_instructions(app.port(), &demo);
    }
    app.run_until_stopped(stop).await?;
    // What was counted since the last flush, so a restart loses no usage
    // (after a flush in progress, if any); then the tasks stop.
    if let Err(e) = crate::usage::flush(&state_usage, usage_store.as_ref(), args.store.store_timeout * 2).await {
        tracing::warn!(error = %e, "could not write the last key usage before stopping");
    }
    stopper.stop();
    if let Ok(task) = ended_rx.await {
        anyhow::bail!("the background task {task} stopped, so the server did; exiting for a restart");
    }
    tracing::info!("stopped");
    Ok(())
}

/// In development mode: the configured key if it exists, else a generated
/// RS256 key kept in the data folder (so tokens survive restarts).
fn dev_signing_key_path(args: &ServeArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = args.private_key_path.as_deref().filter(|p| p.exists()) {
        return Ok(path.to_owned());
    }
    let path = args.data_dir.join("jwk-priv.json");
    if path.exists() {
        return Ok(path);
    }
    create_private_dir(&args.data_dir)?;
    let (_, text) = SigningKey::generate(Algorithm::Rs256, None)?;
    write_private_jwk(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    tracing::warn!(
        path = %path.display(),
        "generated a DEVELOPMENT signing key; production needs a key from `token-exchange keygen` in --private-key-path"
    );
    Ok(path)
}

/// The development data folder, readable by its owner only: it holds a
/// signing key, demo API keys and a database of hashes.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // A folder made by an older version (0755) is tightened too.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))
}

/// Demo API keys, as files in the data folder (the store keeps only hashes,
/// so the plaintext must be kept somewhere to print it again next time).
struct DemoKeys {
    integration: Option<String>,
    autojoin: Option<String>,
}

const DEMO_INTEGRATION_FILE: &str = "demo-integration-key";
const DEMO_AUTOJOIN_FILE: &str = "demo-autojoin-key";

async fn dev_demo_keys(store: &dyn Store, data_dir: &Path) -> anyhow::Result<DemoKeys> {
    if store.is_empty().await? {
        let (key, _) = super::admin::create_integration_key(
            store,
            "demo",
            None,
            0,
            "created by serve --dev",
            "demo key created by serve --dev",
            None,
        )
        .await?;
        write_private_file(&data_dir.join(DEMO_INTEGRATION_FILE), key.to_secret_string().expose())?;
        match store
            .create_org("demo", "demo@example.org", time::OffsetDateTime::now_utc())
            .await
        {
            Ok(()) | Err(store::StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let org_key = super::admin::create_autojoin_key(store, "demo", None).await?;
        write_private_file(&data_dir.join(DEMO_AUTOJOIN_FILE), org_key.secret().expose())?;
        tracing::info!("created the demo integration and organization \"demo\"");
    }
    let read = |name: &str| {
        std::fs::read_to_string(data_dir.join(name))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    Ok(DemoKeys {
        integration: read(DEMO_INTEGRATION_FILE),
        autojoin: read(DEMO_AUTOJOIN_FILE),
    })
}

fn write_private_file(path: &Path, text: &str) -> anyhow::Result<()> {
    // Replace a stale file from an earlier, deleted database.
    let _ = std::fs::remove_file(path);
    write_private_jwk(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn print_dev_instructions(port: u16, demo: &DemoKeys) {
    let base = format!("http://127.0.0.1:{port}");
    println!();
    println!("token-exchange is running in DEVELOPMENT mode on {base}");
    println!();
    match &demo.integration {
        Some(key) => {
            println!("Exchange the demo integration key for a token (lives 20 s):");
            println!("  curl -s -X POST {base}/v0/token/integration -d '{{\"api_key\":\"{key}\"}}'");
        }
        None => {
            println!("Create an integration key, then POST it to {base}/v0/token/integration:");
            println!("  token-exchange integration create --store <the same --store> --integration-id demo");
        }
    }
    if let Some(key) = &demo.autojoin {
        println!("Exchange the demo autojoin key for a token (lives 1 h):");
        println!("  curl -s -X POST {base}/v0/token/autojoin -d '{{\"api_key\":\"{key}\"}}'");
    }
    println!("Public keys to verify tokens with:");
    println!("  curl -s {base}/.well-known/jwks.json");
    println!();
}
