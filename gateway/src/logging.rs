//! Log output: human-readable by default, one JSON object per line with
//! `LOG_FORMAT=json` for log shippers. Children's output passes through here
//! too, tagged with the child's name.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is `LOG_LEVEL`: a level or a full filter.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).with_current_span(false).init();
    } else {
        builder.with_target(false).init();
    }
}
