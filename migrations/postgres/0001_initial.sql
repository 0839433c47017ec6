-- The same tables as the SQLite store (migrations/sqlite), with
-- PostgreSQL's types. Timestamps are RFC 3339 text in UTC, as there, so both
-- stores run the same statements.

CREATE TABLE integrations (
    integration_id TEXT PRIMARY KEY,
    description    TEXT NOT NULL DEFAULT '',
    created_at     TEXT NOT NULL
);

CREATE TABLE integration_keys (
    integration_id TEXT NOT NULL REFERENCES integrations (integration_id) ON DELETE CASCADE,
    key_id         TEXT NOT NULL,
    -- Lowercase hex SHA-256 of the key secret; the secret is never stored.
    key_hash       TEXT NOT NULL,
    status         TEXT NOT NULL,
    tier           BIGINT NOT NULL DEFAULT 0,
    description    TEXT NOT NULL DEFAULT '',
    created_at     TEXT NOT NULL,
    PRIMARY KEY (integration_id, key_id)
);

CREATE TABLE organizations (
    name                   TEXT PRIMARY KEY,
    email                  TEXT NOT NULL,
    created_at             TEXT NOT NULL,
    probability_multiplier DOUBLE PRECISION
);

CREATE TABLE autojoin_keys (
    -- Lowercase hex SHA-256 of the key; never the key itself.
    key_hash   TEXT PRIMARY KEY,
    org        TEXT NOT NULL REFERENCES organizations (name) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);

CREATE INDEX autojoin_keys_by_org ON autojoin_keys (org);
