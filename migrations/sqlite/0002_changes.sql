-- Changes made by admin commands, in commit order (SQLite has one writer at
-- a time). Running servers poll rows past the last `seq` they saw and drop
-- what each change made stale from their caches (src/store/changes.rs).
-- Only the newest rows are kept: a server that fell further behind sees a
-- gap in `seq` and drops its whole cache.
CREATE TABLE changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    -- integration_key, integration or organization.
    kind    TEXT NOT NULL,
    -- The integration ID or the organization.
    subject TEXT NOT NULL,
    key_id  TEXT NOT NULL DEFAULT '',
    -- RFC 3339, UTC, with fractions of a second.
    at      TEXT NOT NULL
);
