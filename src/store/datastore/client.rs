//! A thin client for the Datastore v1 REST API: lookup, runQuery,
//! beginTransaction, commit, rollback. It owns authentication, timeouts,
//! the one retry of reads, and the sorting of failures into transient
//! (worth retrying; a 503 to callers) and permanent.

use std::time::Duration;

use axum::http::Extensions;
use google_cloud_auth::credentials::{self, CacheableResource, Credentials};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::wire::{
    BeginTransactionResponse, CommitRequest, Entity, ErrorBody, Key, LookupRequest, LookupResponse, PartitionId,
    ReadOptions, RollbackRequest, RunQueryRequest, RunQueryResponse,
};

/// Where production Datastore lives.
const PRODUCTION_BASE: &str = "https://datastore.googleapis.com";
/// The OAuth scope for Datastore data access.
const DATASTORE_SCOPE: &str = "https://www.googleapis.com/auth/datastore";
/// Pause before the one retry of a failed read: long enough to step over
/// a dropped connection, short enough to stay well within a request.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How long start-up waits for the metadata server's first token, and in
/// how many tries: on Google Cloud it answers in milliseconds.
const METADATA_PROBE: Duration = Duration::from_secs(5);
const METADATA_ATTEMPTS: u32 = 3;

/// The Application Default Credentials file google-cloud-auth reads, if
/// there is one: `GOOGLE_APPLICATION_CREDENTIALS` (a missing file there is
/// already an error when the credentials are built), else gcloud's file
/// under `$HOME`. Without one, it falls back to the metadata server.
fn adc_file() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
        return Some(path.into());
    }
    let home = std::path::PathBuf::from(std::env::var_os("HOME")?);
    Some(home.join(".config/gcloud/application_default_credentials.json")).filter(|p| p.is_file())
}

/// A Datastore call that failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Unreachable, timed out, overloaded (5xx, 429, UNAVAILABLE): may work later.
    #[error("{0}")]
    Transient(String),
    /// A transaction lost to a concurrent one; running it again may succeed.
    #[error("{0}")]
    Aborted(String),
    /// An insert hit an existing entity.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Anything else: a bad request, no permission, an unreadable answer.
    #[error("{0}")]
    Permanent(String),
}

impl CallError {
    fn is_transient(&self) -> bool {
        matches!(self, CallError::Transient(_) | CallError::Aborted(_))
    }
}

enum Auth {
    /// The emulator takes no credentials.
    None,
    Google(Credentials),
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    project: String,
    auth: Auth,
}

impl Client {
    /// A client for `project`. Given an emulator host it talks plain HTTP
    /// to it without credentials, as Google's clients do; otherwise it uses
    /// Application Default Credentials.
    pub fn new(project: &str, timeout: Duration, emulator_host: Option<&str>) -> Result<Self, CallError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| CallError::Permanent(format!("cannot build the HTTP client: {e}")))?;
        let (base, auth) = match emulator_host.filter(|h| !h.is_empty()) {
            Some(host) => {
                let base = if host.contains("://") {
                    host.to_owned()
                } else {
                    format!("http://{host}")
                };
                (base, Auth::None)
            }
            None => {
                let creds = credentials::Builder::default()
                    .with_scopes([DATASTORE_SCOPE])
                    .build()
                    .map_err(|e| CallError::Permanent(format!("no Google credentials: {e}")))?;
                (PRODUCTION_BASE.to_owned(), Auth::Google(creds))
            }
        };
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            project: project.to_owned(),
            auth,
        })
    }

    pub fn uses_emulator(&self) -> bool {
        matches!(self.auth, Auth::None)
    }

    /// Fails when there are no credentials to be had: no emulator, no
    /// credentials file, and no metadata server answering. A server set up
    /// like that would refuse every key, so it must not start. (Given a
    /// file, its tokens are not fetched here: an identity provider that is
    /// down is an outage, answered with 503s, not a configuration error.)
    pub async fn check_credentials(&self) -> Result<(), CallError> {
        let Auth::Google(creds) = &self.auth else {
            return Ok(());
        };
        if adc_file().is_some() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + METADATA_PROBE;
        let mut last = String::from("no answer in time");
        for attempt in 1..=METADATA_ATTEMPTS {
            match tokio::time::timeout_at(deadline, creds.headers(Extensions::new())).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => break,
            }
            if attempt < METADATA_ATTEMPTS {
                tokio::time::sleep(RETRY_PAUSE * 4).await;
            }
        }
        Err(CallError::Permanent(format!(
            "no Google credentials: not on Google Cloud (the metadata server did not give a token: {last}), \
             GOOGLE_APPLICATION_CREDENTIALS is not set, and there is no file from \
             `gcloud auth application-default login`. Set DATASTORE_EMULATOR_HOST to use the emulator, \
             set up Application Default Credentials, or choose another store with --store/STORE \
             (sqlite:PATH or postgres://...)"
        )))
    }

    async fn call<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        method: &str,
        body: &Req,
    ) -> Result<Resp, CallError> {
        let url = format!("{}/v1/projects/{}:{method}", self.base, self.project);
        let mut request = self.http.post(&url).json(body);
        if let Auth::Google(creds) = &self.auth {
            match creds.headers(Extensions::new()).await {
                Ok(CacheableResource::New { data, .. }) => request = request.headers(data),
                // Only possible when a previous entity tag is passed, which we never do.
                Ok(CacheableResource::NotModified) => {}
                Err(e) if e.is_transient() => {
                    return Err(CallError::Transient(format!("credentials: {e}")));
                }
                Err(e) => return Err(CallError::Permanent(format!("credentials: {e}"))),
            }
        }
        let response = request.send().await.map_err(|e| {
            // Connection refused, reset, DNS, timeout: all worth a retry.
            CallError::Transient(format!("{method}: {}", error_chain(&e)))
        })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| CallError::Transient(format!("{method}: reading the answer: {}", error_chain(&e))))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                // Never the serde_json text: it would quote entity values.
                CallError::Permanent(format!(
                    "{method}: unexpected answer: {}",
                    crate::json::describe_error(&e)
                ))
            });
        }
        let detail = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_default().error;
        let what = format!("{method}: HTTP {status} {} {}", detail.status, detail.message);
        Err(match (status.as_u16(), detail.status.as_str()) {
            (_, "ALREADY_EXISTS") => CallError::AlreadyExists(what),
            (_, "ABORTED") => CallError::Aborted(what),
            (_, "UNAVAILABLE" | "DEADLINE_EXCEEDED" | "RESOURCE_EXHAUSTED" | "INTERNAL") => CallError::Transient(what),
            (429 | 500..=599, _) => CallError::Transient(what),
            _ => CallError::Permanent(what),
        })
    }

    /// A read, retried once if the first attempt failed transiently.
    async fn read<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        method: &str,
        body: &Req,
    ) -> Result<Resp, CallError> {
        match self.call(method, body).await {
            Err(e) if e.is_transient() => {
                tracing::debug!(error = %e, "Datastore read failed; retrying once");
                tokio::time::sleep(RETRY_PAUSE).await;
                self.call(method, body).await
            }
            other => other,
        }
    }

    /// Looks up keys; inside `transaction` if given.
    pub async fn lookup(&self, keys: &[Key], transaction: Option<&str>) -> Result<LookupResponse, CallError> {
        let request = LookupRequest {
            keys,
            read_options: transaction.map(|transaction| ReadOptions { transaction }),
        };
        let response: LookupResponse = if transaction.is_some() {
            self.call("lookup", &request).await?
        } else {
            self.read("lookup", &request).await?
        };
        if !response.deferred.is_empty() {
            return Err(CallError::Transient("lookup: Datastore deferred some keys".into()));
        }
        Ok(response)
    }

    pub async fn run_query(
        &self,
        partition: &PartitionId,
        query: serde_json::Value,
    ) -> Result<RunQueryResponse, CallError> {
        let request = RunQueryRequest {
            partition_id: partition,
            query,
            read_options: None,
        };
        self.read("runQuery", &request).await
    }

    /// Every result of `query`, page by page; inside `transaction` if given.
    pub async fn run_query_all(
        &self,
        partition: &PartitionId,
        mut query: serde_json::Value,
        transaction: Option<&str>,
    ) -> Result<Vec<Entity>, CallError> {
        let mut entities = Vec::new();
        // Bounded, in case a misbehaving server keeps saying "more".
        for _ in 0..10_000 {
            let request = RunQueryRequest {
                partition_id: partition,
                query: query.clone(),
                read_options: transaction.map(|transaction| ReadOptions { transaction }),
            };
            let response: RunQueryResponse = match transaction {
                Some(_) => self.call("runQuery", &request).await?,
                None => self.read("runQuery", &request).await?,
            };
            let batch = response.batch;
            let page_was_empty = batch.entity_results.is_empty();
            entities.extend(batch.entity_results.into_iter().map(|r| r.entity));
            match (batch.more_results.as_deref(), batch.end_cursor) {
                (Some("NOT_FINISHED" | "MORE_RESULTS_AFTER_CURSOR"), Some(cursor)) if !page_was_empty => {
                    query["startCursor"] = serde_json::Value::String(cursor);
                }
                _ => return Ok(entities),
            }
        }
        Err(CallError::Permanent("runQuery: too many pages".into()))
    }

    pub async fn begin_transaction(&self) -> Result<String, CallError> {
        let response: BeginTransactionResponse = self.call("beginTransaction", &serde_json::json!({})).await?;
        Ok(response.transaction)
    }

    /// Applies `mutations` atomically: within `transaction`, or on their own.
    pub async fn commit(&self, transaction: Option<&str>, mutations: Vec<serde_json::Value>) -> Result<(), CallError> {
        let request = CommitRequest {
            mode: if transaction.is_some() {
                "TRANSACTIONAL"
            } else {
                "NON_TRANSACTIONAL"
            },
            transaction,
            mutations,
        };
        let _: serde_json::Value = self.call("commit", &request).await?;
        Ok(())
    }

    /// Best effort: a transaction left open expires on its own.
    pub async fn rollback(&self, transaction: &str) {
        let result: Result<serde_json::Value, _> = self.call("rollback", &RollbackRequest { transaction }).await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "Datastore rollback failed");
        }
    }
}

/// reqwest's top-level message hides the cause ("error sending request");
/// the chain says what actually happened (connection refused, timed out).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
