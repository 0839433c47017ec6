//! The Datastore v1 REST shapes we send and receive, and nothing else.
//!
//! Property values stay `serde_json::Value`s: entities written by other
//! programs may carry value types we never use (arrays, blobs, ...), and
//! reading them must not fail because of a property we ignore.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionId {
    pub project_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathElement {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Numeric IDs are JSON strings (int64); we never create them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    pub partition_id: PartitionId,
    pub path: Vec<PathElement>,
}

impl Key {
    /// The name of the last path element: the entity's own name.
    pub fn name(&self) -> Option<&str> {
        self.path.last()?.name.as_deref()
    }

    /// The path element of the parent, if the entity has one.
    pub fn parent(&self) -> Option<&PathElement> {
        let n = self.path.len();
        (n >= 2).then(|| &self.path[n - 2])
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    pub key: Key,
    #[serde(default)]
    pub properties: Map<String, Value>,
}

impl Entity {
    pub fn string(&self, name: &str) -> Option<&str> {
        self.properties.get(name)?.get("stringValue")?.as_str()
    }

    /// A `timestampValue` (RFC 3339), or empty if absent.
    pub fn timestamp(&self, name: &str) -> String {
        self.properties
            .get(name)
            .and_then(|v| v.get("timestampValue"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    /// A `doubleValue`; `None` if absent or null.
    pub fn double(&self, name: &str) -> Option<f64> {
        self.properties.get(name)?.get("doubleValue")?.as_f64()
    }

    /// An `integerValue` (a JSON string holding an int64).
    pub fn integer(&self, name: &str) -> Option<i64> {
        let v = self.properties.get(name)?.get("integerValue")?;
        match v {
            Value::String(s) => s.parse().ok(),
            other => other.as_i64(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntityResult {
    pub entity: Entity,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LookupRequest<'a> {
    pub keys: &'a [Key],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_options: Option<ReadOptions<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ReadOptions<'a> {
    pub transaction: &'a str,
}

#[derive(Debug, Default, Deserialize)]
pub struct LookupResponse {
    #[serde(default)]
    pub found: Vec<EntityResult>,
    #[serde(default)]
    pub missing: Vec<EntityResult>,
    /// Keys the service did not get to; a single-key lookup should never
    /// have any, and if it does the answer is incomplete.
    #[serde(default)]
    pub deferred: Vec<Key>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunQueryRequest<'a> {
    pub partition_id: &'a PartitionId,
    pub query: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_options: Option<ReadOptions<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct RunQueryResponse {
    pub batch: QueryBatch,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryBatch {
    #[serde(default)]
    pub entity_results: Vec<EntityResult>,
    /// Where the next page starts.
    #[serde(default)]
    pub end_cursor: Option<String>,
    /// `NO_MORE_RESULTS` on the last page.
    #[serde(default)]
    pub more_results: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct BeginTransactionResponse {
    pub transaction: String,
}

#[derive(Debug, Serialize)]
pub struct CommitRequest<'a> {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction: Option<&'a str>,
    pub mutations: Vec<Value>,
}

#[derive(Debug, Serialize)]
pub struct RollbackRequest<'a> {
    pub transaction: &'a str,
}

/// The error document Google APIs answer with.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: ErrorDetail,
}

#[derive(Debug, Default, Deserialize)]
pub struct ErrorDetail {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub message: String,
}

pub fn string(s: &str) -> Value {
    json!({ "stringValue": s })
}

pub fn integer(i: i64) -> Value {
    json!({ "integerValue": i.to_string() })
}

pub fn double(f: f64) -> Value {
    json!({ "doubleValue": f })
}

/// Datastore keeps microseconds; sending more digits would be truncated
/// anyway, so send exactly what will be stored.
pub fn timestamp(t: OffsetDateTime) -> Value {
    let t = t.to_offset(time::UtcOffset::UTC);
    let micros = t.nanosecond() / 1000 * 1000;
    // Unwraps: a nanosecond value below 10^9 is always valid, and RFC 3339
    // formatting fails only outside years 0..=9999.
    let t = t.replace_nanosecond(micros).expect("valid nanosecond");
    json!({ "timestampValue": t.format(&Rfc3339).expect("timestamp in RFC 3339 range") })
}

/// An equality query on one property, for at most `limit` entities.
pub fn equality_query(kind: &str, property: &str, value: Value, limit: i32) -> Value {
    json!({
        "kind": [{ "name": kind }],
        "filter": { "propertyFilter": { "property": { "name": property }, "op": "EQUAL", "value": value } },
        "limit": limit,
    })
}

/// All entities of `kind` under `ancestor`.
pub fn ancestor_query(kind: &str, ancestor: &Key, keys_only: bool) -> Value {
    let mut query = json!({
        "kind": [{ "name": kind }],
        "filter": { "propertyFilter": {
            "property": { "name": "__key__" },
            "op": "HAS_ANCESTOR",
            "value": { "keyValue": ancestor },
        } },
    });
    if keys_only {
        query["projection"] = json!([{ "property": { "name": "__key__" } }]);
    }
    query
}

/// All entities of `kind`.
pub fn kind_query(kind: &str) -> Value {
    json!({ "kind": [{ "name": kind }] })
}

/// A keys-only query for at most `limit` entities of `kind`.
pub fn keys_only_query(kind: &str, limit: i32) -> Value {
    json!({
        "kind": [{ "name": kind }],
        "projection": [{ "property": { "name": "__key__" } }],
        "limit": limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_rest_shapes() {
        assert_eq!(integer(2), json!({"integerValue": "2"}));
        assert_eq!(double(1.0), json!({"doubleValue": 1.0}));
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_767_323_045_123_456_789).unwrap();
        assert_eq!(timestamp(t), json!({"timestampValue": "2026-01-02T03:04:05.123456Z"}));
    }

    #[test]
    fn entities_tolerate_unknown_value_types() {
        let e: Entity = serde_json::from_value(json!({
            "key": {"partitionId": {"projectId": "p"}, "path": [{"kind": "K", "name": "n"}]},
            "properties": {"tier": {"integerValue": "2"}, "odd": {"arrayValue": {}}, "s": {"stringValue": "x"}}
        }))
        .unwrap();
        assert_eq!(e.integer("tier"), Some(2));
        assert_eq!(e.string("s"), Some("x"));
        assert_eq!(e.string("odd"), None);
        assert_eq!(e.key.name(), Some("n"));
        assert_eq!(e.key.parent(), None);
    }
}
