//! Logging: JSON lines for machines (the server's default) or text for
//! people, to stderr.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, IsTerminal as _};
use std::os::fd::AsFd as _;
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime as _;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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
        LogFormat::Json => builder.event_format(JsonLines).init(),
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

/// JSON lines in the shape of tracing-subscriber's JSON format (which the
/// service used before, and log pipelines parse): `timestamp` (RFC 3339,
/// microseconds, UTC), `level`, `fields` (with `message`), `target`.
///
/// Written straight into the line buffer: the stock formatter went through
/// serde for every field and formatted the timestamp into a string of its
/// own first, which made the access line the largest cost of a `/health`
/// request after the kernel's (see BENCHMARKS.md). The service opens no
/// spans, so none are written.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\",\"fields\":{{", meta.level())?;
        let mut fields = JsonFields {
            out: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str("},\"target\":")?;
        json_string(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes an event's fields as JSON members.
struct JsonFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.out.write_char(',')?;
            }
            json_string(self.out, field.name())?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |out| json_string(out, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; serde_json writes null for them too.
        if value.is_finite() {
            self.member(field, |out| write!(out, "{value}"));
        } else {
            self.member(field, |out| out.write_str("null"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |out| {
            out.write_char('"')?;
            write!(JsonEscaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

fn json_string(out: &mut Writer<'_>, text: &str) -> fmt::Result {
    out.write_char('"')?;
    JsonEscaped(out).write_str(text)?;
    out.write_char('"')
}

/// Escapes what JSON requires inside a string: quotes, backslashes and
/// control characters.
struct JsonEscaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for JsonEscaped<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 => "",
                _ => continue,
            };
            self.0.write_str(&text[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&text[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn json_lines(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines().map(|l| serde_json::from_str(l).expect(l)).collect()
    }

    #[test]
    fn log_output_writes_whole_lines_to_its_file_or_stderr() {
        use std::io::{Read as _, Seek as _, Write as _};
        let mut file = tempfile::tempfile().unwrap();
        let output = LogOutput(Some(file.try_clone().unwrap()));
        let mut writer = &output;
        assert_eq!(writer.write(b"one\n").unwrap(), 4);
        writer.write_all(b"two\n").unwrap();
        writer.flush().unwrap();
        let mut written = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut written).unwrap();
        assert_eq!(written, "one\ntwo\n");
        // Without a descriptor of its own it falls back to stderr.
        let fallback = LogOutput(None);
        let mut writer = &fallback;
        assert_eq!(writer.write(b"").unwrap(), 0);
        writer.write_all(b"").unwrap();
        assert!(stderr_writer().0.is_some());
    }

    #[test]
    fn json_lines_have_the_stock_shape_and_escape_what_json_needs() {
        let awkward = "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓";
        let lines = json_lines(|| {
            tracing::info!(
                method = "POST",
                status = 200u16,
                latency_ms = 1.25,
                negative = -3i64,
                flag = true,
                nan = f64::NAN,
                missing = Option::<&str>::None,
                text = awkward,
                shown = %awkward,
                debugged = ?("a", 1),
                "request"
            );
            tracing::warn!(error = %"went \"wrong\"", "store failed; {} left", 2);
        });
        assert_eq!(lines.len(), 2);
        let first = &lines[0];
        let members: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(members, ["fields", "level", "target", "timestamp"]);
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["target"], module_path!());
        let stamp = first["timestamp"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).is_ok(),
            "{stamp}"
        );
        let fields = &first["fields"];
        assert_eq!(fields["message"], "request");
        assert_eq!(fields["method"], "POST");
        assert_eq!(fields["status"], 200);
        assert_eq!(fields["latency_ms"], 1.25);
        assert_eq!(fields["negative"], -3);
        assert_eq!(fields["flag"], true);
        assert!(fields["nan"].is_null());
        assert!(fields.get("missing").is_none());
        assert_eq!(fields["text"], awkward);
        assert_eq!(fields["shown"], awkward);
        assert_eq!(fields["debugged"], "(\"a\", 1)");
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["fields"]["message"], "store failed; 2 left");
        assert_eq!(lines[1]["fields"]["error"], "went \"wrong\"");
    }
}
