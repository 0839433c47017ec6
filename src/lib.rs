//! token-exchange: turns long-lived API keys into short-lived signed JWTs.
//!
//! A caller POSTs an API key; the service checks it against a store, signs a
//! JWT with a private JWK, and answers with the token. Verifiers fetch the
//! public keys from `/.well-known/jwks.json`. The wire format, the claims and
//! the Datastore layout are fixed by M-Lab's Go service (see COMPAT.md).
//!
//! # Layout
//!
//! Dependencies point one way, from the top floor down; `scripts/check-layers`
//! (run by `scripts/test`) fails on a cycle and on any module below `cli` and
//! `app` that uses `config`.
//!
//! - [`cli`]: the admin subcommands and `serve` (top floor, with `main`).
//! - [`config`]: command-line flags and their environment variables, turned
//!   into each module's own settings ([`store::StoreSettings`],
//!   [`cache::CacheSettings`], [`http::Settings`]).
//! - [`app`]: wiring (store, cache, validator, state) and the listeners;
//!   runs until shutdown with bounded connections.
//! - [`http`]: the router, one file per endpoint, the one place that maps
//!   errors to status codes, and the one layer that logs and measures.
//! - [`background`]: the follower, usage writer and key reloader under one
//!   owner; one that ends stops the server.
//! - [`rotation`]: reloading the signing keys on SIGHUP or file change.
//! - [`rate_limit`]: limits on minting per key (by tier), integration and
//!   organization (off unless configured).
//! - [`validate`]: turns a presented key into a [`claims::Principal`] or a refusal.
//! - [`cache`]: the validation cache in front of the store (TTLs, single flight, stale-if-error).
//! - [`store`]: the store traits, their backends (SQL, Datastore), readiness,
//!   and the layers the request path puts over them (bounded, instrumented).
//! - [`signing`]: JWK parsing and checks (`jwk`), the signing key (`key`), the
//!   published set (`key_set`), key generation and files (`generate`).
//! - [`claims`]: the two token shapes, their audiences and lifetimes.
//! - [`api_key`]: API key formats: parse, generate, hash, verify.
//! - [`metrics`], [`telemetry`], [`json`]: the Prometheus series, log
//!   format and level, JSON error text that is safe to log (ground floor).

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
