//! token-exchange: turns long-lived API keys into short-lived signed JWTs.
//!
//! A caller POSTs an API key; the service checks it against a store, signs a
//! JWT with a private JWK, and answers with the token. Verifiers fetch the
//! public keys from `/.well-known/jwks.json`. The wire format, the claims and
//! the Datastore layout are fixed by M-Lab's Go service (see COMPAT.md).
//!
//! # Layout
//!
//! - [`config`]: command-line flags and their environment variables.
//! - [`app`]: assembles store, signer and router; runs until shutdown.
//! - [`api_key`]: API key formats: parse, generate, hash, verify.
//! - [`validate`]: turns a presented key into a [`claims::Principal`] or a refusal.
//! - [`cache`]: the validation cache in front of the store (TTLs, single flight, stale-if-error).
//! - [`claims`]: the two token shapes, their audiences and lifetimes.
//! - [`signing`]: JWK loading, JWS signing, the public JWKS, key generation.
//! - [`rotation`]: reloading the signing keys on SIGHUP or file change.
//! - [`http`]: the router, one file per endpoint, and the one place that maps
//!   errors to status codes.
//! - [`store`]: the store traits and their backends.
//! - [`metrics`]: the Prometheus series (the Go service's, and ours).
//! - [`telemetry`]: log format and level.
//! - [`json`]: JSON error text that is safe to log.
//! - [`cli`]: the admin subcommands and `serve`.

pub mod api_key;
pub mod app;
pub mod cache;
pub mod claims;
pub mod cli;
pub mod config;
pub mod http;
pub mod json;
pub mod metrics;
pub mod rotation;
pub mod signing;
pub mod store;
pub mod telemetry;
pub mod validate;
