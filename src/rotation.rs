//! Signing-key rotation on a running server.
//!
//! The key files are read again on SIGHUP, and whenever their contents
//! change (checked every `--key-reload-interval`). A reload loads the new
//! set completely (every file parsed, every pair checked, every `kid`
//! distinct) and only then swaps it in, in one step: a request signs with
//! the set it started with. A reload that fails keeps the old set, says why
//! in the log, and is counted in `tokenexchange_signing_key_reloads_total`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::signing::{KeySet, SharedKeys};

/// Where the keys come from.
#[derive(Debug, Clone)]
pub struct KeySource {
    /// The private key that signs.
    pub private: PathBuf,
    /// Files of keys published without signing (next and previous keys).
    pub public: Vec<PathBuf>,
}

impl KeySource {
    pub fn load(&self) -> Result<KeySet, crate::signing::KeyError> {
        KeySet::load(&self.private, &self.public)
    }

    /// A digest of every file's current bytes (or its absence), to notice
    /// a change without parsing.
    fn contents_digest(&self) -> Vec<u8> {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for path in std::iter::once(&self.private).chain(&self.public) {
            match crate::signing::read_key_file(path) {
                Ok(bytes) => {
                    ctx.update(&(bytes.len() as u64).to_be_bytes());
                    ctx.update(&bytes);
                }
                // Missing and unusable (a FIFO) differ, so a change from
                // one to the other is tried, and its failure reported.
                Err(e) => ctx.update(format!("unreadable: {:?}", e.kind()).as_bytes()),
            }
        }
        ctx.finish().as_ref().to_vec()
    }
}

/// Why a reload happened, for the log.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Signal,
    FileChange,
}

/// Loads the set again and swaps it in if it loads; returns whether it did.
pub fn reload(source: &KeySource, keys: &SharedKeys, metrics: &Metrics) -> bool {
    match source.load() {
        Ok(set) => {
            let kids: Vec<String> = set.kids().into_iter().map(str::to_owned).collect();
            tracing::info!(
                active_kid = set.active().kid(),
                alg = set.active().alg().as_str(),
                published = ?kids,
                "signing keys reloaded"
            );
            keys.store(Arc::new(set));
            metrics.key_reloads.with_label_values(&["success"]).inc();
            true
        }
        Err(e) => {
            // The error names the file and the defect, never key material.
            tracing::error!(error = %e, "signing key reload failed; still using the previous keys");
            metrics.key_reloads.with_label_values(&["failure"]).inc();
            false
        }
    }
}

/// Reloads on SIGHUP and on file changes, until the process ends. The
/// SIGHUP handler is installed when this is called (before the server says
/// it listens), so no SIGHUP can arrive unhandled and end the process.
pub fn watch(
    source: KeySource,
    keys: SharedKeys,
    metrics: Arc<Metrics>,
    interval: Duration,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; key files are still polled");
            None
        }
    };
    // Now, before the server listens (blocking is fine at start-up): a
    // change made once it listens must count as a change.
    let seen = source.contents_digest();
    watch_loop(source, seen, keys, metrics, interval, hangup)
}

/// Longest a read of the key files may take before it is called stuck (a
/// hung network mount): the current keys stay, and no other read starts
/// until that one returns.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `read` on a blocking thread, for at most [`READ_TIMEOUT`]. A read
/// that has not returned by then is left in `stuck`.
async fn off_thread<T: Send + 'static>(
    read: impl FnOnce() -> T + Send + 'static,
    stuck: &mut Option<tokio::task::JoinHandle<()>>,
) -> Option<T> {
    if stuck.as_ref().is_some_and(|h| !h.is_finished()) {
        return None;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handle = tokio::task::spawn_blocking(move || {
        let _ = tx.send(read());
    });
    match tokio::time::timeout(READ_TIMEOUT, rx).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(_)) => None,
        Err(_) => {
            tracing::error!(
                timeout = ?READ_TIMEOUT,
                "reading the signing key files did not finish (a hung mount?); still using the current keys"
            );
            *stuck = Some(handle);
            None
        }
    }
}

async fn watch_loop(
    source: KeySource,
    mut seen: Vec<u8>,
    keys: SharedKeys,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut hangup: Option<tokio::signal::unix::Signal>,
) {
    // Every read of the files happens off the async workers: a key path
    // that blocks must not stop the requests they serve.
    let mut stuck = None;
    let digest = |source: &KeySource| {
        let source = source.clone();
        move || source.contents_digest()
    };
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => Trigger::Signal,
            _ = tick.tick() => Trigger::FileChange,
        };
        let Some(now) = off_thread(digest(&source), &mut stuck).await else {
            continue;
        };
        if matches!(trigger, Trigger::FileChange) && now == seen {
            continue;
        }
        tracing::info!(?trigger, "reloading signing keys");
        // A failed load is retried when the files change again (or on the
        // next SIGHUP), not on every tick.
        seen = now;
        let (from, to, counts) = (source.clone(), keys.clone(), metrics.clone());
        if off_thread(move || reload(&from, &to, &counts), &mut stuck)
            .await
            .is_none()
        {
            // Stuck, or still stuck from before: not reloaded.
            metrics.key_reloads.with_label_values(&["failure"]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{Algorithm, SigningKey};

    fn source(dir: &std::path::Path) -> KeySource {
        let (_, text) = SigningKey::generate(Algorithm::EdDsa, None).unwrap();
        let private = dir.join("active.json");
        std::fs::write(&private, text).unwrap();
        KeySource {
            private,
            public: vec![dir.join("published.json")],
        }
    }

    #[test]
    fn a_missing_file_and_one_that_is_not_a_file_differ_from_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let source = source(dir.path());
        let missing = source.contents_digest();
        std::fs::create_dir(&source.public[0]).unwrap();
        let directory = source.contents_digest();
        assert_ne!(missing, directory);
        std::fs::remove_dir(&source.public[0]).unwrap();
        std::fs::write(&source.public[0], "{\"keys\":[]}").unwrap();
        assert_ne!(source.contents_digest(), missing);
    }

    #[test]
    fn a_reload_swaps_in_a_set_that_loads_and_keeps_the_old_one_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let source = source(dir.path());
        std::fs::write(&source.public[0], "{\"keys\":[]}").unwrap();
        let keys: SharedKeys = Arc::new(arc_swap::ArcSwap::from_pointee(source.load().unwrap()));
        let metrics = Metrics::new();
        let first = keys.load().active().kid().to_owned();
        let (_, text) = SigningKey::generate(Algorithm::EdDsa, None).unwrap();
        std::fs::write(&source.private, text).unwrap();
        assert!(reload(&source, &keys, &metrics));
        assert_ne!(keys.load().active().kid(), first);
        std::fs::write(&source.private, "not json").unwrap();
        let second = keys.load().active().kid().to_owned();
        assert!(!reload(&source, &keys, &metrics));
        assert_eq!(keys.load().active().kid(), second);
        assert_eq!(metrics.key_reloads.with_label_values(&["success"]).get(), 1);
        assert_eq!(metrics.key_reloads.with_label_values(&["failure"]).get(), 1);
    }

    #[tokio::test]
    async fn a_read_that_does_not_return_is_left_and_none_starts_meanwhile() {
        let mut stuck = None;
        assert_eq!(off_thread(|| 7, &mut stuck).await, Some(7));
        // A read that panics gives nothing, and is not stuck.
        assert_eq!(off_thread(|| -> u8 { panic!("read failed") }, &mut stuck).await, None);
        assert!(stuck.is_none());
        let started = std::time::Instant::now();
        let hung = off_thread(|| std::thread::sleep(READ_TIMEOUT + Duration::from_secs(2)), &mut stuck).await;
        assert_eq!(hung, None);
        assert!(started.elapsed() < READ_TIMEOUT + Duration::from_secs(1));
        assert!(stuck.is_some());
        // While it hangs, no other read starts.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let next = off_thread(
            move || flag.store(true, std::sync::atomic::Ordering::SeqCst),
            &mut stuck,
        )
        .await;
        assert_eq!(next, None);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
