//! token-exchange: turns long-lived API keys into short-lived signed JWTs.
//!
//! A caller POSTs an API key; the service checks it against a store, signs a
//! JWT with a private JWK, and answers with the token. Verifiers fetch the
//! public keys from `/.well-known/jwks.json`. The wire format, the claims and
//! the Datastore layout are fixed by M-Lab's Go service (see docs/compatibility.md).
//!
//! # Layout
//!
//! Dependencies point one way, from the top floor down; `scripts/check-layers`
//! (run by `scripts/test`) places every module on a floor and fails when one
//! uses a higher floor, on a cycle, on any module below `cli` and `app` that
//! uses `config`, and on a file of over 500 lines of code (tests aside) not
//! named below with its reason. Top floor first:
//!
//! - [`cli`]: the command line (`Cli`) and its subcommands, each declaring
//!   its own flags next to its code: `serve`, `keygen`, `integration`,
//!   `key`, `autojoin`, `audit` (with `main`); `cli/admin.rs` holds what the
//!   admin commands share.
//! - [`config`], [`app`]: the flags several commands share (store, expiry,
//!   listing, `serve`'s server flags) and their environment variables,
//!   turned into each module's own settings ([`store::StoreSettings`],
//!   [`cache::CacheSettings`], [`http::Settings`]); wiring (store, cache,
//!   validator, state) and the listeners, with bounded connections.
//! - [`http`]: the router, one file per endpoint, the one place that maps
//!   errors to status codes, and the one layer that logs and measures.
//! - [`background`], [`invalidation`], [`usage`], [`rotation`]: the
//!   background tasks under one owner (one that ends stops the server), the
//!   change-feed follower, the usage writer, reloading the signing keys.
//! - [`validate`], [`cache`], [`rate_limit`]: a presented key to a
//!   [`claims::Principal`] or a refusal; the validation cache in front of
//!   the store (TTLs, single flight, stale-if-error); limits on minting.
//! - [`store`]: the store traits and the rulebook every backend follows
//!   (`store::rules`: each admin write's audit record, published change and
//!   errors), the polling change feed (`store::changes`), and the backends
//!   as twin folders, each split by job (`connect`/`mod`, `lookup`, `admin`,
//!   `listing`, `feed`): `store::sql` (SQLite, PostgreSQL), `store::datastore`
//!   (plus its REST `client` and `wire` format) and `store::memory` (the
//!   reference, for tests; not selectable with `--store`); readiness and the
//!   layers the request path puts over a store (bounded, instrumented).
//!   `tests/conformance` holds every backend to the same cases.
//! - [`metrics`]: the Prometheus series.
//! - [`signing`], [`claims`], [`api_key`]: JWK parsing and checks, the
//!   signing key, the published set, key generation and files; the two
//!   token shapes; API key formats (parse, generate, hash, verify).
//! - [`ground`], [`telemetry`], [`json`]: clocks, random bytes, SHA-256; log
//!   format and level; JSON error text that is safe to log (ground floor).

pub mod api_key;
pub mod app;
pub mod background;
pub mod cache;
pub mod claims;
pub mod cli;
pub mod config;
pub mod ground;
pub mod http;
pub mod invalidation;
pub mod json;
pub mod metrics;
pub mod rate_limit;
pub mod rotation;
pub mod signing;
pub mod store;
pub mod telemetry;
pub mod usage;
pub mod validate;
