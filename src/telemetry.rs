//! Logging: JSON lines for machines (the server's default) or text for
//! people, to stderr.

use std::fs::File;
use std::io::{self, IsTerminal as _};
use std::os::fd::AsFd as _;
use std::sync::Arc;

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
        .with_writer(stderr_writer())
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

/// Where log lines go: standard error, written without std's lock.
///
/// `std::io::stderr()` serialises writers on a lock; with a line per
/// request from every worker thread, that lock was contended on most
/// requests and each contention cost a futex sleep and wake (about half
/// the system calls `/health` made beyond reading and answering). The
/// subscriber formats a whole line before writing it with one `write_all`,
/// and the kernel keeps one write whole (pipes up to 4 KiB, files under
/// their offset lock), so the lock bought nothing. A duplicate of
/// descriptor 2 gives the same destination without `unsafe`.
struct LogOutput(Option<File>);

impl io::Write for &LogOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            Some(file) => {
                let mut file = file;
                file.write(buf)
            }
            None => io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &self.0 {
            Some(file) => {
                let mut file = file;
                file.write_all(buf)
            }
            None => io::stderr().write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn stderr_writer() -> Arc<LogOutput> {
    // Without a descriptor to spare at start, the locked writer still works.
    Arc::new(LogOutput(
        io::stderr().as_fd().try_clone_to_owned().ok().map(File::from),
    ))
}
