//! `/health`: liveness only. It answers as long as the process serves HTTP.

pub(super) async fn health() -> &'static str {
    "ok"
}
