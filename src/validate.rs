//! Turns a presented API key into the identity a token is issued for.
//!
//! Every way a key can be wrong ends in [`Rejection::Invalid`], which the
//! HTTP layer answers with one fixed 401, so a caller cannot tell a malformed
//! key from an unknown or revoked one. A store that fails is
//! [`Rejection::Unavailable`]: the caller should retry, not give up.
//!
//! Well-formed keys go through the [`KeyCache`]; malformed ones are refused
//! before it, so they cost neither a store read nor a cache entry.

use std::sync::Arc;

use crate::api_key::{AutojoinApiKey, IntegrationApiKey};
use crate::cache::{Grant, KeyCache, Verdict, cache_key};
use crate::claims::Principal;
use crate::store::{AutojoinKeys, IntegrationKeys, STATUS_ACTIVE, StoreError, UsageKey};

/// Why a key did not yield a principal.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The key is not valid. The reason is for the log only; it never names
    /// the key or its secret.
    #[error("invalid API key: {0}")]
    Invalid(String),
    /// The store could not answer, and no cached verdict could stand in.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Cache-key prefixes, so the two kinds of key never share an entry.
const INTEGRATION: u8 = b'i';
const AUTOJOIN: u8 = b'a';

/// Validates keys against the stores, through the cache.
#[derive(Clone)]
pub struct Validator {
    integration: Arc<dyn IntegrationKeys>,
    autojoin: Arc<dyn AutojoinKeys>,
    cache: Arc<KeyCache>,
}

impl Validator {
    pub fn new(integration: Arc<dyn IntegrationKeys>, autojoin: Arc<dyn AutojoinKeys>, cache: Arc<KeyCache>) -> Self {
        Self {
            integration,
            autojoin,
            cache,
        }
    }

    /// The validation cache, for invalidations from the store's change feed.
    pub fn cache(&self) -> &Arc<KeyCache> {
        &self.cache
    }

    /// Checks a client-integration key: well formed, known, active, and its
    /// secret hashes to the stored hash.
    pub async fn integration(&self, presented: &str) -> Result<Grant, Rejection> {
        let key: IntegrationApiKey = presented
            .parse()
            .map_err(|e: crate::api_key::ParseError| Rejection::Invalid(e.to_string()))?;
        let verdict = self
            .cache
            .verdict(cache_key(INTEGRATION, presented), || self.check_integration(&key))
            .await
            .map_err(|e| Rejection::Unavailable(e.0))?;
        into_result(verdict)
    }

    async fn check_integration(&self, key: &IntegrationApiKey) -> Result<Verdict, StoreError> {
        let Some(record) = self
            .integration
            .integration_key(key.integration_id(), key.key_id())
            .await?
        else {
            return Ok(Verdict::Invalid(format!(
                "no key {} in integration {}",
                key.key_id(),
                key.integration_id()
            )));
        };
        // The hash is compared before the status so that an attacker who
        // knows a revoked key ID learns nothing from timing either way.
        let secret_ok = key.secret().matches_hash(&record.key_hash);
        if record.status != STATUS_ACTIVE {
            return Ok(Verdict::Invalid(format!(
                "key {} of integration {} is not active",
                key.key_id(),
                key.integration_id()
            )));
        }
        if !secret_ok {
            return Ok(Verdict::Invalid(format!(
                "wrong secret for key {} of integration {}",
                key.key_id(),
                key.integration_id()
            )));
        }
        Ok(Verdict::Valid(Grant {
            principal: Principal::Integration {
                int_id: key.integration_id().to_owned(),
                key_id: key.key_id().to_owned(),
                tier: record.tier,
            },
            expires_at: record.expires_at,
            usage: UsageKey::Integration {
                integration_id: key.integration_id().to_owned(),
                key_id: key.key_id().to_owned(),
            },
        }))
    }

    /// Checks an autojoin key: bounded, and held by an organization.
    pub async fn autojoin(&self, presented: &str) -> Result<Grant, Rejection> {
        let key: AutojoinApiKey = presented
            .parse()
            .map_err(|e: crate::api_key::AutojoinKeyError| Rejection::Invalid(e.to_string()))?;
        let verdict = self
            .cache
            .verdict(cache_key(AUTOJOIN, presented), || async {
                Ok(match self.autojoin.autojoin_org(&key).await? {
                    Some(record) => Verdict::Valid(Grant {
                        principal: Principal::Autojoin { org: record.org },
                        expires_at: record.expires_at,
                        usage: UsageKey::Autojoin {
                            key_hash: key.secret().sha256_hex(),
                        },
                    }),
                    None => Verdict::Invalid(format!("unknown autojoin key (fingerprint {})", key.fingerprint())),
                })
            })
            .await
            .map_err(|e| Rejection::Unavailable(e.0))?;
        into_result(verdict)
    }
}

fn into_result(verdict: Verdict) -> Result<Grant, Rejection> {
    match verdict {
        Verdict::Valid(grant) => Ok(grant),
        Verdict::Invalid(why) => Err(Rejection::Invalid(why)),
    }
}
