//! When each key was last used and how many tokens it bought: counted in
//! memory on the request path (a map update), written to the store in the
//! background, at most once per key per flush interval, in one batch. A
//! store that fails never fails or slows an exchange: the counts stay in
//! memory and go with the next flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use time::OffsetDateTime;

use crate::store::{Admin, KeyUsage, UsageKey};

/// Keys counted between two flushes at most. Only valid keys are counted,
/// so this is reached only with more keys in use than any deployment has;
/// beyond it, new keys wait for the next interval.
const MAX_PENDING: usize = 100_000;

/// Counts since the last flush, per key.
#[derive(Default)]
pub struct UsageRecorder {
    pending: Mutex<HashMap<UsageKey, (OffsetDateTime, u64)>>,
    /// Held by a flush from taking the counts to writing or restoring
    /// them, so the last flush at shutdown waits for one in progress
    /// instead of racing it (counts taken by a flush the process exits in
    /// the middle of would be lost).
    writing: tokio::sync::Mutex<()>,
}

impl UsageRecorder {
    fn lock(&self) -> MutexGuard<'_, HashMap<UsageKey, (OffsetDateTime, u64)>> {
        // Every update is a single insert or add: a panic cannot leave a
        // half-made entry.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One token issued for `key` at `at`.
    pub fn record(&self, key: &UsageKey, at: OffsetDateTime) {
        let mut pending = self.lock();
        if let Some((last, count)) = pending.get_mut(key) {
            *last = (*last).max(at);
            *count += 1;
        } else if pending.len() < MAX_PENDING {
            pending.insert(key.clone(), (at, 1));
        }
    }

    /// Everything counted so far, leaving nothing behind.
    pub fn take(&self) -> Vec<KeyUsage> {
        self.lock()
            .drain()
            .map(|(key, (last_used_at, tokens))| KeyUsage {
                key,
                last_used_at,
                tokens,
            })
            .collect()
    }

    /// Puts back counts that could not be written, merged with new ones.
    pub fn restore(&self, usage: Vec<KeyUsage>) {
        let mut pending = self.lock();
        for u in usage {
            let entry = pending.entry(u.key).or_insert((u.last_used_at, 0));
            entry.0 = entry.0.max(u.last_used_at);
            entry.1 += u.tokens;
        }
    }
}

/// Writes the counts every `interval` until the process ends.
pub async fn flush_every(recorder: Arc<UsageRecorder>, store: Arc<dyn Admin>, interval: Duration, timeout: Duration) {
    let mut failing = false;
    loop {
        tokio::time::sleep(interval).await;
        match flush(&recorder, store.as_ref(), timeout).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("writing key usage again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot write key usage; keeping the counts for the next try");
            }
            Err(_) => {}
        }
    }
}

/// Writes what was counted; on failure keeps it for the next flush.
pub async fn flush(recorder: &UsageRecorder, store: &dyn Admin, timeout: Duration) -> Result<(), String> {
    let _writing = recorder.writing.lock().await;
    let usage = recorder.take();
    if usage.is_empty() {
        return Ok(());
    }
    let result = match tokio::time::timeout(timeout, store.record_usage(&usage)).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {timeout:?}"),
    };
    recorder.restore(usage);
    Err(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> UsageKey {
        UsageKey::Integration {
            integration_id: "acme".into(),
            key_id: id.into(),
        }
    }

    #[test]
    fn counts_are_kept_per_key_until_taken_and_put_back_when_not_written() {
        let r = UsageRecorder::default();
        let t0 = OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1);
        r.record(&key("ki_a"), t0);
        r.record(&key("ki_a"), t0 + time::Duration::seconds(5));
        r.record(&key("ki_a"), t0 + time::Duration::seconds(2));
        r.record(&key("ki_b"), t0);
        let mut taken = r.take();
        taken.sort_by_key(|u| format!("{:?}", u.key));
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0].key, key("ki_a"));
        assert_eq!(taken[0].tokens, 3);
        assert_eq!(taken[0].last_used_at, t0 + time::Duration::seconds(5));
        assert!(r.take().is_empty(), "taken once");

        // A failed write comes back, merged with what was counted since.
        r.record(&key("ki_a"), t0 + time::Duration::seconds(9));
        r.restore(taken);
        let again: HashMap<UsageKey, (OffsetDateTime, u64)> = r
            .take()
            .into_iter()
            .map(|u| (u.key, (u.last_used_at, u.tokens)))
            .collect();
        assert_eq!(again[&key("ki_a")], (t0 + time::Duration::seconds(9), 4));
        assert_eq!(again[&key("ki_b")], (t0, 1));
    }
}
