-- The same data the Datastore layout keeps (see COMPAT.md), in tables.
-- Timestamps are RFC 3339 text in UTC, which sorts chronologically.

CREATE TABLE integrations (
    integration_id TEXT PRIMARY KEY NOT NULL,
    description    TEXT NOT NULL DEFAULT '',
    created_at     TEXT NOT NULL
);

CREATE TABLE integration_keys (
    integration_id TEXT NOT NULL REFERENCES integrations (integration_id) ON DELETE CASCADE,
    key_id         TEXT NOT NULL,
    -- Lowercase hex SHA-256 of the key secret; the secret is never stored.
    key_hash       TEXT NOT NULL,
    status         TEXT NOT NULL,
    tier           INTEGER NOT NULL DEFAULT 0,
    description    TEXT NOT NULL DEFAULT '',
    created_at     TEXT NOT NULL,
    PRIMARY KEY (integration_id, key_id)
);

CREATE TABLE organizations (
    name                   TEXT PRIMARY KEY NOT NULL,
    email                  TEXT NOT NULL,
    created_at             TEXT NOT NULL,
    probability_multiplier REAL
);

CREATE TABLE autojoin_keys (
    -- Lowercase hex SHA-256 of the key. Unlike the Datastore layout (which
    -- other programs read), we do not keep autojoin keys in plain text.
    key_hash   TEXT PRIMARY KEY NOT NULL,
    org        TEXT NOT NULL REFERENCES organizations (name) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);

CREATE INDEX autojoin_keys_by_org ON autojoin_keys (org);
