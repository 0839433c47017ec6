//! Logging: JSON lines for machines (the server's default) or text for
//! people, to stderr.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// Installs the global subscriber. `level` is a filter such as `info` or
/// `token_exchange=debug,info`; without one, `RUST_LOG` is used, then
/// `default_level`.
pub fn init(format: LogFormat, level: Option<&str>, default_level: &str) -> Result<(), String> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        // By default a failed log write is reported with eprintln!, which
        // panics when stderr is a closed pipe; losing a log line must never
        // take the server down.
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    Ok(())
}
