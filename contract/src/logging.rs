//! Log output of both binaries: one line per event on stderr, for people
//! (`LOG_FORMAT=pretty`, colour only on a terminal without `NO_COLOR`) or for machines
//! (`LOG_FORMAT=json`, one object per line for log shippers).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl LogFormat {
    /// `pretty` (or empty) and `json`, in any case; `None` otherwise.
    pub fn parse(text: &str) -> Option<LogFormat> {
        match text.trim().to_ascii_lowercase().as_str() {
            "pretty" | "" => Some(LogFormat::Pretty),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Pretty => "pretty",
            LogFormat::Json => "json",
        }
    }
}

/// `LOG_LEVEL` as a filter: a level (`info`) or a full tracing filter.
///
/// The PostgreSQL driver is held at `info` unless the filter names it: at
/// `debug` it logs every statement's parameters, which carry the API key,
/// preference values and, with accounts, password hashes. Someone debugging
/// the driver itself asks for it by name (`LOG_LEVEL=debug,tokio_postgres=debug`).
pub fn filter(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let filter = EnvFilter::try_new(level)?;
    if level.contains("tokio_postgres") {
        return Ok(filter);
    }
    Ok(filter.add_directive("tokio_postgres=info".parse()?))
}

/// Installs the global subscriber. `level` must have passed [`filter`]
/// (configuration checks it); a bad one falls back to `info`.
pub fn init(level: &str, format: LogFormat) {
    init_with(level, format, None);
}

/// A layer that sees every event the filter lets through, beside stderr
/// (the gateway's in-memory log ring).
pub type ExtraLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// [`init`], with `extra` receiving the same events as stderr: one filter
/// decides for both, so the ring holds exactly what the log shows.
pub fn init_with(level: &str, format: LogFormat, extra: Option<ExtraLayer>) {
    use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, Layer};
    let filter = filter(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr: ExtraLayer = match format {
        LogFormat::Json => fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr).boxed(),
        // journald stamps every line itself; a second time in the text is noise.
        LogFormat::Pretty if stderr_is_journal() => fmt::layer().without_time().with_target(false).with_ansi(false).with_writer(std::io::stderr).boxed(),
        LogFormat::Pretty => fmt::layer().with_target(false).with_ansi(colour()).with_writer(std::io::stderr).boxed(),
    };
    let mut layers = vec![stderr];
    layers.extend(extra);
    tracing_subscriber::registry().with(layers.with_filter(filter)).init();
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to
/// the `<device>:<inode>` of the stream it connects to stdout and stderr;
/// a child that inherited the variable with stderr redirected elsewhere
/// (a file, a pipe) does not match it.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else { return false };
    let Ok(meta) = std::fs::File::from(stderr).metadata() else { return false };
    names_stream(&value.to_string_lossy(), meta.dev(), meta.ino())
}

/// `JOURNAL_STREAM`'s `<device>:<inode>` (decimal) against a file's.
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    value.split_once(':').is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

/// Colour codes only for a person at a terminal: never into a file, a pipe
/// (the gateway reading a child) or a journal, and never with `NO_COLOR` set
/// (<https://no-color.org>).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_names_one_device_and_inode() {
        assert!(names_stream("8:12345", 8, 12345));
        assert!(!names_stream("8:12345", 8, 12346));
        assert!(!names_stream("9:12345", 8, 12345));
        assert!(!names_stream("", 8, 12345));
        assert!(!names_stream("8", 8, 12345));
    }

    #[test]
    fn formats_parse_in_any_case_and_round_trip() {
        assert_eq!(LogFormat::parse("JSON"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse(""), Some(LogFormat::Pretty));
        assert_eq!(LogFormat::parse("xml"), None);
        for f in [LogFormat::Pretty, LogFormat::Json] {
            assert_eq!(LogFormat::parse(f.as_str()), Some(f));
        }
    }

    #[test]
    fn levels_and_filters_are_checked() {
        assert!(filter("debug").is_ok());
        assert!(filter("info,omni_api=trace").is_ok());
        assert!(filter("x=[[").is_err());
    }

    #[test]
    fn the_driver_stays_at_info_unless_named() {
        assert!(filter("debug").unwrap().to_string().contains("tokio_postgres=info"));
        assert!(!filter("debug,tokio_postgres=trace").unwrap().to_string().contains("tokio_postgres=info"));
    }
}
