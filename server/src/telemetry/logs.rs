//! Logging set-up: `tracing` with an env filter, to stderr. One line per
//! lifecycle event (listeners, volumes, jobs); per-I/O events are `debug`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber.
///
/// # Errors
/// A malformed filter.
pub fn init(filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("log filter {filter:?}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| e.to_string())
}
