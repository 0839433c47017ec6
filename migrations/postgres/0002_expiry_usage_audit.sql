-- Key expiry, usage written by servers, and the audit log of admin changes
-- (as migrations/sqlite/0003_expiry_usage_audit.sql).

ALTER TABLE integration_keys ADD COLUMN expires_at TEXT;
ALTER TABLE integration_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE integration_keys ADD COLUMN tokens_issued BIGINT NOT NULL DEFAULT 0;

ALTER TABLE autojoin_keys ADD COLUMN expires_at TEXT;
ALTER TABLE autojoin_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE autojoin_keys ADD COLUMN tokens_issued BIGINT NOT NULL DEFAULT 0;

CREATE TABLE audit_log (
    seq            BIGSERIAL PRIMARY KEY,
    at             TEXT NOT NULL,
    operator       TEXT NOT NULL,
    action         TEXT NOT NULL,
    integration_id TEXT,
    key_id         TEXT,
    org            TEXT,
    fingerprint    TEXT,
    before         TEXT,
    after          TEXT
);
