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
        let emulator_host = emulator_host.filter(|h| !h.is_empty());
        let mut http = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout);
        if emulator_host.is_some_and(|h| !h.starts_with("https://")) {
            // Plain HTTP to the emulator: no TLS, so no trust store either.
            // Reading the system's (some 150 files) was most of the time
            // from start to the first answer.
            http = http.tls_certs_only(std::iter::empty());
        }
        let http = http
            .build()
            .map_err(|e| CallError::Permanent(format!("cannot build the HTTP client: {e}")))?;
        let (base, auth) = match emulator_host {
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::http::{StatusCode, Uri};
    use serde_json::{Value, json};

    use super::*;

    /// What the fake Datastore answers, in order, and what it was asked.
    #[derive(Default)]
    struct Script {
        answers: VecDeque<(u16, String, Duration)>,
        asked: Vec<(String, Value)>,
    }

    /// A loopback HTTP server playing Datastore from a script; returns a
    /// client of it (through the emulator setting, so without credentials).
    async fn fake(answers: &[(u16, &str)], timeout: Duration) -> (Client, Arc<Mutex<Script>>) {
        let script = Arc::new(Mutex::new(Script {
            answers: answers
                .iter()
                .map(|(s, b)| (*s, (*b).to_owned(), Duration::ZERO))
                .collect(),
            asked: Vec::new(),
        }));
        let shared = script.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, body: Bytes| {
            let script = shared.clone();
            async move {
                let (status, body, delay) = {
                    let mut s = script.lock().unwrap();
                    let asked = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    s.asked.push((uri.path().to_owned(), asked));
                    s.answers.pop_front().expect("asked more often than scripted")
                };
                tokio::time::sleep(delay).await;
                (StatusCode::from_u16(status).unwrap(), body)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        // The scheme and a trailing slash are accepted, as Google's clients do.
        let client = Client::new("proj", timeout, Some(&format!("http://{addr}/"))).unwrap();
        (client, script)
    }

    fn key() -> Key {
        serde_json::from_value(json!({
            "partitionId": {"projectId": "proj"},
            "path": [{"kind": "K", "name": "n"}],
        }))
        .unwrap()
    }

    fn error(status: &str) -> String {
        json!({"error": {"status": status, "message": "m"}}).to_string()
    }

    #[tokio::test]
    async fn answers_are_sorted_into_transient_and_permanent() {
        let cases = [
            (409, error("ALREADY_EXISTS"), "AlreadyExists"),
            (409, error("ABORTED"), "Aborted"),
            (503, error("UNAVAILABLE"), "Transient"),
            (504, error("DEADLINE_EXCEEDED"), "Transient"),
            (429, error("RESOURCE_EXHAUSTED"), "Transient"),
            (500, "<html>oops</html>".to_owned(), "Transient"),
            (502, String::new(), "Transient"),
            (400, error("INVALID_ARGUMENT"), "Permanent"),
            (403, error("PERMISSION_DENIED"), "Permanent"),
            (404, "not json".to_owned(), "Permanent"),
        ];
        let answers: Vec<(u16, &str)> = cases.iter().map(|(s, b, _)| (*s, b.as_str())).collect();
        let (client, script) = fake(&answers, Duration::from_secs(2)).await;
        for (status, _, expected) in &cases {
            // A commit is not retried: one call, one answer.
            let err = client.commit(None, vec![]).await.unwrap_err();
            let kind = match &err {
                CallError::Transient(_) => "Transient",
                CallError::Aborted(_) => "Aborted",
                CallError::AlreadyExists(_) => "AlreadyExists",
                CallError::Permanent(_) => "Permanent",
            };
            assert_eq!(kind, *expected, "HTTP {status}: {err}");
            assert!(err.to_string().contains(&format!("commit: HTTP {status}")), "{err}");
        }
        let s = script.lock().unwrap();
        assert_eq!(s.asked.len(), cases.len());
        assert_eq!(s.asked[0].0, "/v1/projects/proj:commit");
        assert_eq!(s.asked[0].1, json!({"mode": "NON_TRANSACTIONAL", "mutations": []}));
    }

    #[tokio::test]
    async fn reads_are_retried_once_and_writes_never() {
        let found = r#"{"found": [], "missing": []}"#;
        let (client, script) = fake(
            &[(503, ""), (200, found), (503, ""), (500, ""), (503, "")],
            Duration::from_secs(2),
        )
        .await;
        client.lookup(&[key()], None).await.unwrap();
        assert_eq!(script.lock().unwrap().asked.len(), 2);
        let err = client.lookup(&[key()], None).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert_eq!(script.lock().unwrap().asked.len(), 4, "exactly one retry");
        // Inside a transaction a read is not retried (the transaction is).
        assert!(client.lookup(&[key()], Some("tx")).await.is_err());
        let s = script.lock().unwrap();
        assert_eq!(s.asked.len(), 5);
        assert_eq!(s.asked[4].1["readOptions"], json!({"transaction": "tx"}));
    }

    #[tokio::test]
    async fn malformed_or_incomplete_answers_are_errors_that_quote_no_data() {
        let (client, _) = fake(
            &[
                (200, r#"{"found": [{"entity": "secret-value-123"}]}"#),
                (200, "{"),
                (
                    200,
                    r#"{"deferred": [{"partitionId": {"projectId": "proj"}, "path": []}]}"#,
                ),
                (200, r#"{"transaction": 5}"#),
            ],
            Duration::from_secs(2),
        )
        .await;
        let err = client.lookup(&[key()], Some("tx")).await.unwrap_err();
        assert!(matches!(err, CallError::Permanent(_)), "{err}");
        assert!(err.to_string().contains("lookup: unexpected answer"), "{err}");
        assert!(!err.to_string().contains("secret-value-123"), "{err}");
        let err = client.lookup(&[key()], Some("tx")).await.unwrap_err();
        assert!(matches!(err, CallError::Permanent(_)), "{err}");
        // Deferred keys would silently read as missing: an outage instead.
        let err = client.lookup(&[key()], Some("tx")).await.unwrap_err();
        assert!(
            matches!(&err, CallError::Transient(m) if m.contains("deferred")),
            "{err}"
        );
        let err = client.begin_transaction().await.unwrap_err();
        assert!(matches!(err, CallError::Permanent(_)), "{err}");
    }

    #[tokio::test]
    async fn queries_follow_cursors_to_the_end() {
        let entity = |n: &str| json!({"entity": {"key": {"partitionId": {"projectId": "proj"}, "path": [{"kind": "K", "name": n}]}}});
        let page = |names: &[&str], more: &str, cursor: Option<&str>| {
            json!({"batch": {
                "entityResults": names.iter().map(|n| entity(n)).collect::<Vec<_>>(),
                "moreResults": more,
                "endCursor": cursor,
            }})
            .to_string()
        };
        let pages = [
            page(&["a", "b"], "NOT_FINISHED", Some("c1")),
            page(&["c"], "MORE_RESULTS_AFTER_CURSOR", Some("c2")),
            // An empty page that still says "more" ends the walk.
            page(&[], "NOT_FINISHED", Some("c3")),
        ];
        let answers: Vec<(u16, &str)> = pages.iter().map(|p| (200, p.as_str())).collect();
        let (client, script) = fake(&answers, Duration::from_secs(2)).await;
        let partition = PartitionId {
            project_id: "proj".into(),
            namespace_id: "ns".into(),
        };
        let query = json!({"kind": [{"name": "K"}]});
        let entities = client.run_query_all(&partition, query, None).await.unwrap();
        let names: Vec<_> = entities.iter().map(|e| e.key.path[0].name.clone().unwrap()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let s = script.lock().unwrap();
        let cursors: Vec<&Value> = s.asked.iter().map(|(_, q)| &q["query"]["startCursor"]).collect();
        assert_eq!(cursors, [&Value::Null, &json!("c1"), &json!("c2")]);
        assert_eq!(
            s.asked[0].1["partitionId"],
            json!({"projectId": "proj", "namespaceId": "ns"})
        );
    }

    #[tokio::test]
    async fn a_slow_answer_is_a_transient_timeout_and_a_failed_rollback_is_only_logged() {
        let (client, script) = fake(&[], Duration::from_millis(200)).await;
        script
            .lock()
            .unwrap()
            .answers
            .push_back((200, "{}".into(), Duration::from_secs(5)));
        script
            .lock()
            .unwrap()
            .answers
            .push_back((500, String::new(), Duration::ZERO));
        let started = std::time::Instant::now();
        let err = client.commit(Some("tx"), vec![]).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(
            matches!(&err, CallError::Transient(m) if m.contains("timed out")),
            "{err}"
        );
        client.rollback("tx").await;
        assert_eq!(script.lock().unwrap().asked[1].1, json!({"transaction": "tx"}));
    }
}
