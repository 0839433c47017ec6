-- Key expiry, usage written by servers, and the audit log of admin changes.
-- Times are RFC 3339 text in UTC in whole seconds (fixed width, so they
-- compare as text).

ALTER TABLE integration_keys ADD COLUMN expires_at TEXT;
ALTER TABLE integration_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE integration_keys ADD COLUMN tokens_issued INTEGER NOT NULL DEFAULT 0;

ALTER TABLE autojoin_keys ADD COLUMN expires_at TEXT;
ALTER TABLE autojoin_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE autojoin_keys ADD COLUMN tokens_issued INTEGER NOT NULL DEFAULT 0;

-- Appended in the transaction of each change; never a secret or a hash.
CREATE TABLE audit_log (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    at             TEXT NOT NULL,
    operator       TEXT NOT NULL,
    action         TEXT NOT NULL,
    integration_id TEXT,
    key_id         TEXT,
    org            TEXT,
    fingerprint    TEXT,
    -- JSON objects of the audited values (status, tier, expiry), or NULL.
    before         TEXT,
    after          TEXT
);
