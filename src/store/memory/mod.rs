//! A store in this process's memory: the reference behaviour of the
//! rulebook (`rules`), for unit tests and for the conformance suite's
//! first run. Not selectable with `--store`: nothing survives the process,
//! and no second replica or admin command could share it.
//!
//! It can be put in the states the other stores reach by accident: out of
//! service ([`MemoryStore::set_unavailable`]) and restored from a copy
//! ([`MemoryStore::snapshot`], [`MemoryStore::restore`]).

mod admin;
mod feed;
mod listing;
mod lookup;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use time::OffsetDateTime;

use super::StoreError;
use super::changes::{ChangeNotice, Logged, Position};
use super::rules::Effects;
use crate::store::AuditRecord;

/// Everything the store holds; cloned, it is a backup.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    integrations: BTreeMap<String, Integration>,
    orgs: BTreeMap<String, Org>,
    audit: Vec<AuditRecord>,
    changes: Vec<Logged>,
}

#[derive(Debug, Clone)]
struct Integration {
    description: String,
    created_at: String,
    keys: BTreeMap<String, IntegrationKey>,
}

#[derive(Debug, Clone)]
struct IntegrationKey {
    hash: String,
    status: String,
    tier: i64,
    description: String,
    created_at: String,
    expires_at: Option<String>,
    usage: Usage,
}

#[derive(Debug, Clone, Default)]
struct Usage {
    last_used_at: Option<OffsetDateTime>,
    tokens: i64,
}

#[derive(Debug, Clone)]
struct Org {
    email: String,
    created_at: String,
    /// By the key's SHA-256 (hex).
    keys: BTreeMap<String, AutojoinKey>,
}

#[derive(Debug, Clone)]
struct AutojoinKey {
    created_at: String,
    expires_at: Option<String>,
    usage: Usage,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Snapshot>,
    unavailable: AtomicBool,
}

/// A handle on one in-memory store; clones share it, as two admin
/// commands share a database.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
    /// Named in the audit log.
    operator: String,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Names `operator` in the audit records of changes made through this handle.
    pub fn with_operator(mut self, operator: &str) -> Self {
        operator.clone_into(&mut self.operator);
        self
    }

    /// While set, every call fails as an unreachable store does.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// A copy of everything, as a backup would take it.
    pub fn snapshot(&self) -> Snapshot {
        self.lock_state().clone()
    }

    /// Puts back a copy taken earlier, as restoring a backup does.
    pub fn restore(&self, snapshot: Snapshot) {
        *self.lock_state() = snapshot;
    }

    fn lock_state(&self) -> MutexGuard<'_, Snapshot> {
        // A panic while holding the lock leaves whole values behind (every
        // write replaces entries), so the state is still usable.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state, or `Unavailable` while out of service.
    fn state(&self) -> Result<MutexGuard<'_, Snapshot>, StoreError> {
        if self.shared.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the in-memory store is set unavailable".into()));
        }
        Ok(self.lock_state())
    }
}

impl Snapshot {
    /// Records and publishes what a write does, with the write (the lock is held).
    fn apply(&mut self, effects: Effects) {
        self.audit.push(effects.audit);
        if let Some(what) = effects.publish {
            let seq = self.changes.last().map_or(0, |c| c.position.seq) + 1;
            self.changes.push(Logged {
                position: Position {
                    seq,
                    tag: crate::ground::random_hex(8),
                },
                notice: ChangeNotice {
                    what,
                    at: Some(OffsetDateTime::now_utc()),
                },
            });
        }
    }
}
