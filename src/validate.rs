//! Turns a presented API key into the identity a token is issued for.
//!
//! Every way a key can be wrong ends in [`Rejection::Invalid`], which the
//! HTTP layer answers with one fixed 401, so a caller cannot tell a malformed
//! key from an unknown or revoked one. A store that fails is
//! [`Rejection::Unavailable`]: the caller should retry, not give up.

use std::sync::Arc;

use crate::api_key::{AutojoinApiKey, IntegrationApiKey};
use crate::claims::Principal;
use crate::store::{AutojoinKeys, IntegrationKeys, STATUS_ACTIVE, StoreError};

/// Why a key did not yield a principal.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The key is not valid. The reason is for the log only; it never names
    /// the key or its secret.
    #[error("invalid API key: {0}")]
    Invalid(String),
    /// The store could not answer.
    #[error(transparent)]
    Unavailable(#[from] StoreError),
}

/// Validates keys against the stores.
#[derive(Clone)]
pub struct Validator {
    integration: Arc<dyn IntegrationKeys>,
    autojoin: Arc<dyn AutojoinKeys>,
}

impl Validator {
    pub fn new(integration: Arc<dyn IntegrationKeys>, autojoin: Arc<dyn AutojoinKeys>) -> Self {
        Self { integration, autojoin }
    }

    /// Checks a client-integration key: well formed, known, active, and its
    /// secret hashes to the stored hash.
    pub async fn integration(&self, presented: &str) -> Result<Principal, Rejection> {
        let key: IntegrationApiKey = presented
            .parse()
            .map_err(|e: crate::api_key::ParseError| Rejection::Invalid(e.to_string()))?;
        let record = self
            .integration
            .integration_key(key.integration_id(), key.key_id())
            .await?
            .ok_or_else(|| {
                Rejection::Invalid(format!(
                    "no key {} in integration {}",
                    key.key_id(),
                    key.integration_id()
                ))
            })?;
        // The hash is compared before the status so that an attacker who
        // knows a revoked key ID learns nothing from timing either way.
        let secret_ok = key.secret().matches_hash(&record.key_hash);
        if record.status != STATUS_ACTIVE {
            return Err(Rejection::Invalid(format!(
                "key {} of integration {} is not active",
                key.key_id(),
                key.integration_id()
            )));
        }
        if !secret_ok {
            return Err(Rejection::Invalid(format!(
                "wrong secret for key {} of integration {}",
                key.key_id(),
                key.integration_id()
            )));
        }
        Ok(Principal::Integration {
            int_id: key.integration_id().to_owned(),
            key_id: key.key_id().to_owned(),
            tier: record.tier,
        })
    }

    /// Checks an autojoin key: bounded, and held by an organization.
    pub async fn autojoin(&self, presented: &str) -> Result<Principal, Rejection> {
        let key: AutojoinApiKey = presented
            .parse()
            .map_err(|e: crate::api_key::AutojoinKeyError| Rejection::Invalid(e.to_string()))?;
        let org =
            self.autojoin.autojoin_org(&key).await?.ok_or_else(|| {
                Rejection::Invalid(format!("unknown autojoin key (fingerprint {})", key.fingerprint()))
            })?;
        Ok(Principal::Autojoin { org })
    }
}
