//! The change feed: a head entity holding the newest sequence number, and
//! one entity per change, both in this service's own namespace. Writers
//! advance the head in the transaction of their change; servers read it
//! with the polling feed.

use async_trait::async_trait;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::wire::{self, Entity, Key, PartitionId};
use super::{Client, DatastoreStore, TxError, found_entity, properties, upsert};
use crate::store::StoreError;
use crate::store::changes::{CHANGE_KIND, ChangeLog, ChangeNotice, Invalidation, Logged, Position};
use std::sync::Arc;

impl DatastoreStore {
    /// The mutations that publish `what`, committed with the change itself:
    /// the feed's head takes the next sequence number, and the change is
    /// stored under it. Reading the head in the transaction makes concurrent
    /// publishers conflict (one is run again), so sequence numbers are
    /// dense, unique and in commit order, whatever the admin machines'
    /// clocks say. `at` (the admin's clock) is kept for the lag histogram
    /// and for servers of earlier versions, which poll by it.
    pub(super) async fn publish(&self, tx: &str, what: &Invalidation) -> Result<Vec<Value>, TxError> {
        let head_key = feed_head_key(&self.own);
        let found = self.client.lookup(std::slice::from_ref(&head_key), Some(tx)).await?;
        let head = FeedHead::from_entity(found_entity(&found.found, &head_key));
        let next = FeedHead {
            seq: head.seq + 1,
            token: random_token(),
        };
        let (kind, subject, key_id) = what.to_parts();
        let unindexed = |text: &str| json!({ "stringValue": text, "excludeFromIndexes": true });
        // An upsert: after a partial restore (the head from a backup, the
        // changes not) the number may be taken; the head decides.
        let change = upsert(
            Self::key(&self.own, &[(CHANGE_KIND, &change_name(next.seq))]),
            properties([
                ("seq", wire::integer(next.seq)),
                ("token", unindexed(&next.token)),
                ("at", wire::timestamp(OffsetDateTime::now_utc())),
                ("kind", unindexed(kind)),
                ("subject", unindexed(subject)),
                ("key_id", unindexed(key_id)),
            ]),
        );
        let head = upsert(
            head_key,
            properties([
                (
                    "seq",
                    json!({ "integerValue": next.seq.to_string(), "excludeFromIndexes": true }),
                ),
                ("token", unindexed(&next.token)),
            ]),
        );
        Ok(vec![head, change])
    }
}

/// The kind of the change feed's head: one entity holding the sequence
/// number and token of the newest change.
pub const FEED_HEAD_KIND: &str = "TokenExchangeChangeHead";

fn feed_head_key(own: &PartitionId) -> Key {
    DatastoreStore::key(own, &[(FEED_HEAD_KIND, "head")])
}

/// Change names sort like their sequence numbers; the prefix keeps them
/// apart from the time-named changes of earlier versions.
fn change_name(seq: i64) -> String {
    format!("seq-{seq:020}")
}

fn random_token() -> String {
    crate::ground::random_hex(8)
}

/// Where the feed stands: the sequence number of a change and its random
/// token, which tells it apart from a change with the same number in
/// another copy of the database (one restored from a backup).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FeedHead {
    seq: i64,
    token: String,
}

impl FeedHead {
    /// `None`: no change was ever published (seq 0).
    fn from_entity(e: Option<&Entity>) -> Self {
        e.map(|e| Self {
            seq: e.integer("seq").unwrap_or(0),
            token: e.string("token").unwrap_or_default().to_owned(),
        })
        .unwrap_or_default()
    }
}

/// The change log as the polling feed reads it.
pub(super) struct DatastoreLog {
    pub(super) client: Arc<Client>,
    pub(super) partition: PartitionId,
}

#[async_trait]
impl ChangeLog for DatastoreLog {
    async fn newest(&self) -> Result<Position, StoreError> {
        let key = feed_head_key(&self.partition);
        let found = self.client.lookup(std::slice::from_ref(&key), None).await?;
        let head = FeedHead::from_entity(found_entity(&found.found, &key));
        Ok(Position {
            seq: head.seq,
            tag: head.token,
        })
    }

    async fn read_from(&self, from: i64, limit: usize) -> Result<Vec<Logged>, StoreError> {
        let query = json!({
            "kind": [{ "name": CHANGE_KIND }],
            "filter": { "propertyFilter": {
                "property": { "name": "seq" },
                "op": "GREATER_THAN_OR_EQUAL",
                "value": wire::integer(from),
            } },
            "order": [{ "property": { "name": "seq" }, "direction": "ASCENDING" }],
            "limit": limit,
        });
        // Datastore may end a batch before the limit (the emulator at 300):
        // the feed asks again from where this one ends.
        let batch = self.client.run_query(&self.partition, query).await?.batch;
        Ok(batch
            .entity_results
            .iter()
            .map(|result| {
                let entity = &result.entity;
                let head = FeedHead::from_entity(Some(entity));
                let text = |field: &str| entity.string(field).unwrap_or_default().to_owned();
                Logged {
                    position: Position {
                        seq: head.seq,
                        tag: head.token,
                    },
                    notice: ChangeNotice {
                        what: Invalidation::from_parts(&text("kind"), &text("subject"), &text("key_id")),
                        at: OffsetDateTime::parse(
                            &entity.timestamp("at"),
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok(),
                    },
                }
            })
            .collect())
    }
}
