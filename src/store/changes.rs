//! Changes made by admin commands, published so that every running server
//! drops what they made stale from its validation cache within seconds,
//! instead of waiting out the cache TTL.
//!
//! Each store publishes in the same transaction as the change, so a change
//! that commits is always published and one that rolls back never is:
//!
//! - SQLite: a row in `changes`, numbered by `seq` (SQLite has one writer
//!   at a time, so rows commit in `seq` order).
//! - PostgreSQL: `NOTIFY`, delivered at commit to every listening server. A
//!   listener that lost its connection cannot know what it missed, so it
//!   reports [`Invalidation::Everything`] once it is back.
//! - Datastore: an entity of kind [`CHANGE_KIND`] in a namespace of our own
//!   (the kinds Go programs read get no new properties), numbered by a head
//!   entity that every publishing transaction advances.
//! - Memory: a list in the store.
//!
//! The logs (all but PostgreSQL's) are read the same way, by one
//! [`PollingFeed`] over a [`ChangeLog`]: by sequence number, never by the
//! clocks of the machines that wrote them, and owning up to gaps,
//! replaced changes and logs that went back (a restored database).
//!
//! A feed that failed and recovered also reports `Everything`: what changed
//! during the failure may not be known.

use async_trait::async_trait;
use time::OffsetDateTime;

use super::StoreError;

/// The Datastore kind of published changes.
pub const CHANGE_KIND: &str = "TokenExchangeChange";

/// The PostgreSQL notification channel.
pub const PG_CHANNEL: &str = "token_exchange_changes";

/// What a change may have made stale in a server's cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// One integration key: revoked, re-activated, re-tiered, rotated, deleted.
    IntegrationKey { integration_id: String, key_id: String },
    /// An integration and all its keys (deleted).
    Integration { integration_id: String },
    /// An autojoin organization's keys (one deleted, or the organization).
    Organization { org: String },
    /// Anything at all: what changed is not known.
    Everything,
}

impl Invalidation {
    /// The stored form: a kind and up to two names.
    pub fn to_parts(&self) -> (&'static str, &str, &str) {
        match self {
            Self::IntegrationKey { integration_id, key_id } => ("integration_key", integration_id, key_id),
            Self::Integration { integration_id } => ("integration", integration_id, ""),
            Self::Organization { org } => ("organization", org, ""),
            Self::Everything => ("everything", "", ""),
        }
    }

    /// Reads the stored form back. A kind this version does not know (from
    /// a newer one) could mean anything: it drops everything.
    pub fn from_parts(kind: &str, first: &str, second: &str) -> Self {
        match kind {
            "integration_key" => Self::IntegrationKey {
                integration_id: first.to_owned(),
                key_id: second.to_owned(),
            },
            "integration" => Self::Integration {
                integration_id: first.to_owned(),
            },
            "organization" => Self::Organization { org: first.to_owned() },
            _ => Self::Everything,
        }
    }
}

/// One published change, as a server receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeNotice {
    pub what: Invalidation,
    /// When the change was committed (by the admin's clock), if known: the
    /// lag histogram measures from here.
    pub at: Option<OffsetDateTime>,
}

impl ChangeNotice {
    /// `Everything`, now: after a feed lost track.
    pub fn everything() -> Self {
        Self {
            what: Invalidation::Everything,
            at: None,
        }
    }
}

/// The changes a store publishes, as one server follows them.
#[async_trait]
pub trait ChangeFeed: Send {
    /// Waits for the next published changes (about a second at most, when
    /// polling) and returns them, oldest first; possibly none. An error
    /// means the store could not be read; the caller waits and calls again,
    /// and the feed then reports [`Invalidation::Everything`] first.
    async fn next(&mut self) -> Result<Vec<ChangeNotice>, StoreError>;

    /// Times the feed reconnected or recovered from an error so far.
    fn recoveries(&self) -> u64;
}

/// Wraps a feed's read so that the first success after a failure starts
/// with `Everything`, and counts those recoveries.
#[derive(Debug, Default)]
pub struct Recovery {
    failed: bool,
    recoveries: u64,
}

impl Recovery {
    pub fn observe(&mut self, result: Result<Vec<ChangeNotice>, StoreError>) -> Result<Vec<ChangeNotice>, StoreError> {
        match result {
            Ok(mut notices) if self.failed => {
                self.failed = false;
                self.recoveries += 1;
                notices.insert(0, ChangeNotice::everything());
                Ok(notices)
            }
            Ok(notices) => Ok(notices),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Marks the feed as having lost track (a dropped connection) even
    /// though no read failed.
    pub fn lost_track(&mut self) {
        self.failed = true;
    }

    pub fn count(&self) -> u64 {
        self.recoveries
    }
}

/// Where a change log stands: a change's sequence number, and a tag (its
/// commit time in SQLite, a random token in Datastore) that tells it apart
/// from a change with the same number in another copy of the database, such
/// as one restored from a backup. Sequence 0: no change yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub seq: i64,
    pub tag: String,
}

/// One change as a log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub position: Position,
    pub notice: ChangeNotice,
}

/// A store's log of published changes, numbered densely in commit order,
/// which [`PollingFeed`] reads.
#[async_trait]
pub trait ChangeLog: Send + Sync {
    /// The newest change's position.
    async fn newest(&self) -> Result<Position, StoreError>;

    /// The changes numbered `from` or more, oldest first: at most `limit`,
    /// possibly fewer even when more follow.
    async fn read_from(&self, from: i64, limit: usize) -> Result<Vec<Logged>, StoreError>;
}

/// Changes asked for per read.
const CHANGES_PER_PAGE: usize = 500;
/// Reads in one poll at most; a feed further behind goes on from there
/// with the next poll.
const PAGES_PER_POLL: usize = 20;

/// Follows a [`ChangeLog`] by polling it: each poll reads the newest
/// position, then the changes past the last one seen by their number, so
/// nothing depends on the clocks of the machines that wrote them. Whatever
/// shows that changes were missed (the last one read is gone or replaced,
/// numbers skipped, the log went back) is reported as
/// [`Invalidation::Everything`] rather than skipped.
pub struct PollingFeed<L> {
    log: L,
    interval: std::time::Duration,
    /// The last change seen; `None` until the first read.
    last: Option<Position>,
    /// Whether `last` was read as a change, so it must still be there: a
    /// position taken from the newest one alone (at the start, or after
    /// losing track) may name a change the log does not hold.
    last_read: bool,
    recovery: Recovery,
}

impl<L: ChangeLog> PollingFeed<L> {
    pub fn new(log: L, interval: std::time::Duration) -> Self {
        Self {
            log,
            interval,
            last: None,
            last_read: false,
            recovery: Recovery::default(),
        }
    }

    /// Gives up the position: the changes between it and `newest` cannot be
    /// known, so the whole cache goes.
    fn lost_track(&mut self, newest: Position, why: &str) -> Vec<ChangeNotice> {
        tracing::warn!(
            last_seq = self.last.as_ref().map_or(0, |l| l.seq),
            head_seq = newest.seq,
            "{why}: dropping the whole cache"
        );
        self.last = Some(newest);
        self.last_read = false;
        vec![ChangeNotice::everything()]
    }

    async fn poll(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        let newest = self.log.newest().await?;
        let Some(last) = self.last.clone() else {
            // Start at the newest change: the cache is empty, nothing older matters.
            self.last = Some(newest);
            return Ok(Vec::new());
        };
        if newest == last {
            return Ok(Vec::new());
        }
        if newest.seq <= last.seq {
            return Ok(self.lost_track(
                newest,
                "the change log went back (the database was restored from a backup, emptied or replaced)",
            ));
        }
        let mut notices = Vec::new();
        let mut position = last.clone();
        // The last change read must still be there as it was: if it is
        // not, the database was restored from an older copy or replaced
        // (or the log pruned past us), and what changed is not known.
        let mut checked = last.seq == 0;
        let mut pages = 0;
        while position.seq < newest.seq && pages < PAGES_PER_POLL {
            pages += 1;
            let page = self.log.read_from(position.seq, CHANGES_PER_PAGE).await?;
            let before = position.seq;
            for logged in page {
                if !checked {
                    checked = true;
                    if logged.position == last {
                        continue;
                    }
                    if logged.position.seq == last.seq {
                        return Ok(self.lost_track(newest, "the change last read was replaced (a restored database)"));
                    }
                    if self.last_read {
                        return Ok(self.lost_track(
                            newest,
                            "the change last read is gone (restored from an older copy, replaced, or pruned past \
                             this server)",
                        ));
                    }
                }
                if logged.position.seq <= position.seq {
                    continue;
                }
                if logged.position.seq != position.seq + 1 {
                    // Numbers missing in between: changes were missed.
                    notices.push(ChangeNotice::everything());
                }
                position = logged.position;
                notices.push(logged.notice);
            }
            if position.seq == before {
                // The newest position announces changes the log did not
                // return: rather than stand still (and ask again forever),
                // give them up.
                notices.extend(self.lost_track(newest, "changes the log's newest position announces cannot be read"));
                return Ok(notices);
            }
        }
        self.last_read |= position != last;
        self.last = Some(position);
        Ok(notices)
    }
}

#[async_trait]
impl<L: ChangeLog> ChangeFeed for PollingFeed<L> {
    async fn next(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        if self.last.is_some() {
            tokio::time::sleep(self.interval).await;
        }
        let result = self.poll().await;
        self.recovery.observe(result)
    }

    fn recoveries(&self) -> u64 {
        self.recovery.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidations_round_trip_through_their_stored_form() {
        for what in [
            Invalidation::IntegrationKey {
                integration_id: "acme".into(),
                key_id: "ki_1".into(),
            },
            Invalidation::Integration {
                integration_id: "acme".into(),
            },
            Invalidation::Organization { org: "mlab".into() },
            Invalidation::Everything,
        ] {
            let (kind, first, second) = what.to_parts();
            assert_eq!(Invalidation::from_parts(kind, first, second), what);
        }
        assert_eq!(
            Invalidation::from_parts("from_a_newer_version", "x", "y"),
            Invalidation::Everything
        );
    }

    #[test]
    fn the_first_success_after_a_failure_drops_everything() {
        let one = || {
            vec![ChangeNotice {
                what: Invalidation::Organization { org: "o".into() },
                at: None,
            }]
        };
        let mut r = Recovery::default();
        assert_eq!(r.observe(Ok(one())).unwrap(), one());
        assert!(r.observe(Err(StoreError::Unavailable("down".into()))).is_err());
        assert!(r.observe(Err(StoreError::Unavailable("down".into()))).is_err());
        let after = r.observe(Ok(one())).unwrap();
        assert_eq!(after[0].what, Invalidation::Everything);
        assert_eq!(&after[1..], one().as_slice());
        assert_eq!(r.observe(Ok(vec![])).unwrap(), vec![]);
        assert_eq!(r.count(), 1);
        r.lost_track();
        assert_eq!(r.observe(Ok(vec![])).unwrap(), vec![ChangeNotice::everything()]);
        assert_eq!(r.count(), 2);
    }
}
