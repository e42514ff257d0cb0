//! Command line and environment configuration of `blockmirrord`.
//!
//! Every flag has a `BLOCKMIRROR_*` environment twin, so the Helm chart only
//! sets environment variables. Everything is validated before any socket is
//! bound.

use clap::Parser;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path (access is controlled by file mode).
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "unix: needs a socket path, e.g. unix:/run/blockmirror/blockmirror.sock".into(),
                );
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(Self::Tcp)
                .map_err(|e| format!("tcp:{addr}: {e}; expected tcp:HOST:PORT with a numeric IP, e.g. tcp:127.0.0.1:7070"))
        } else {
            Err(format!("{s:?}: expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// blockmirrord — live block-storage mirroring service.
///
/// Serves the blockmirror.v1 gRPC API (volumes, data I/O, mirror jobs,
/// events) and exports volumes over NBD. With no flags it keeps its state in
/// ./blockmirror-state, serves gRPC on the unix socket
/// ./blockmirror-state/blockmirror.sock and NBD on ./blockmirror-state/nbd.sock.
///
/// Telemetry: with OTEL_EXPORTER_OTLP_ENDPOINT (or its _TRACES_ / _METRICS_
/// forms) set, spans and metrics go to that OTLP/gRPC collector; the
/// standard OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
/// OTEL_TRACES_SAMPLER(_ARG) and OTEL_EXPORTER_OTLP_* variables apply.
/// Unset, nothing is exported and nothing is measured beyond the per-job
/// percentiles of GetJob. --metrics-listen serves the same metrics to
/// Prometheus.
#[derive(Debug, Clone, Parser)]
#[command(name = "blockmirrord", version, about, long_about)]
pub struct Config {
    /// State directory: volume definitions, job records, created volumes.
    #[arg(
        long,
        env = "BLOCKMIRROR_STATE_DIR",
        default_value = "blockmirror-state"
    )]
    pub state_dir: PathBuf,

    /// gRPC listener, unix:PATH or tcp:HOST:PORT; repeat for several.
    /// Default: unix:STATE_DIR/blockmirror.sock.
    #[arg(long = "listen", env = "BLOCKMIRROR_LISTEN", value_delimiter = ',')]
    pub listen: Vec<ListenAddr>,

    /// NBD listener, unix:PATH or tcp:HOST:PORT; repeat for several.
    /// Default: unix:STATE_DIR/nbd.sock. TCP binds only where you say
    /// (use a loopback address unless the network is trusted: NBD has no
    /// authentication).
    #[arg(
        long = "nbd-listen",
        env = "BLOCKMIRROR_NBD_LISTEN",
        value_delimiter = ','
    )]
    pub nbd_listen: Vec<ListenAddr>,

    /// Events kept for WatchEvents replay (older ones answer OUT_OF_RANGE).
    #[arg(long, env = "BLOCKMIRROR_EVENT_HISTORY", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub event_history: u64,

    /// MiB of guest write payloads each volume holds at once while no
    /// mirror job copies it (a job's buf_size bounds them while one does).
    /// Past it, the NBD server stops reading that volume's requests.
    #[arg(long, env = "BLOCKMIRROR_VOLUME_INFLIGHT_MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub volume_inflight_mib: u32,

    /// Seconds between WatchEvents heartbeats.
    #[arg(long, env = "BLOCKMIRROR_HEARTBEAT_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,

    /// Seconds to wait for jobs and in-flight I/O at shutdown (SIGTERM).
    #[arg(long, env = "BLOCKMIRROR_SHUTDOWN_GRACE_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_secs: u64,

    /// Log filter (tracing EnvFilter syntax), e.g. info or blockmirror_engine=debug.
    #[arg(long, env = "BLOCKMIRROR_LOG", default_value = "info")]
    pub log: String,

    /// Fraction of guest writes (and copy operations) traced, 0 to 1,
    /// decided per write before any span is built. Applies only while
    /// traces are exported (OTEL_EXPORTER_OTLP_ENDPOINT set).
    #[arg(long, env = "BLOCKMIRROR_TRACE_WRITE_SAMPLE_RATIO", default_value_t = 0.01,
          value_parser = parse_ratio)]
    pub trace_write_sample_ratio: f64,

    /// Guest writes and copy operations slower than this many
    /// milliseconds are always traced, whatever the sample ratio
    /// (0 = off).
    #[arg(long, env = "BLOCKMIRROR_TRACE_SLOW_WRITE_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub trace_slow_write_ms: u64,

    /// Serve Prometheus metrics (text format, GET /metrics) on HOST:PORT,
    /// e.g. 0.0.0.0:9464. Off by default.
    #[arg(long, env = "BLOCKMIRROR_METRICS_LISTEN", value_parser = parse_metrics_addr)]
    pub metrics_listen: Option<SocketAddr>,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        Ok(r) => Err(format!("{r} is not between 0 and 1")),
        Err(e) => Err(format!(
            "{s:?}: {e}; expected a number between 0 and 1, e.g. 0.01"
        )),
    }
}

fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("{s:?}: {e}; expected HOST:PORT with a numeric IP, e.g. 0.0.0.0:9464"))
}

impl Config {
    /// The listeners to bind: the flags, or the default socket.
    pub fn listeners(&self) -> Vec<ListenAddr> {
        if self.listen.is_empty() {
            vec![ListenAddr::Unix(self.state_dir.join("blockmirror.sock"))]
        } else {
            self.listen.clone()
        }
    }

    /// The NBD listeners to bind: the flags, or the default socket.
    pub fn nbd_listeners(&self) -> Vec<ListenAddr> {
        if self.nbd_listen.is_empty() {
            vec![ListenAddr::Unix(self.state_dir.join("nbd.sock"))]
        } else {
            self.nbd_listen.clone()
        }
    }

    /// [`Self::volume_inflight_mib`] in bytes.
    pub fn volume_inflight_bytes(&self) -> u32 {
        self.volume_inflight_mib.saturating_mul(1 << 20)
    }

    /// Heartbeat period.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    /// Grace period at shutdown.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Writes slower than this are always traced; `None` = off.
    pub fn trace_slow_write(&self) -> Option<Duration> {
        (self.trace_slow_write_ms > 0).then(|| Duration::from_millis(self.trace_slow_write_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_listeners() {
        let c = Config::try_parse_from(["blockmirrord"]).unwrap();
        assert_eq!(
            c.listeners(),
            vec![ListenAddr::Unix(PathBuf::from(
                "blockmirror-state/blockmirror.sock"
            ))]
        );
        let c = Config::try_parse_from([
            "blockmirrord",
            "--listen",
            "tcp:127.0.0.1:0,unix:/tmp/x.sock",
        ])
        .unwrap();
        assert_eq!(c.listeners().len(), 2);
        let c = Config::try_parse_from(["blockmirrord"]).unwrap();
        assert!((c.trace_write_sample_ratio - 0.01).abs() < f64::EPSILON);
        assert_eq!(c.volume_inflight_bytes(), 16 << 20);
        assert!(Config::try_parse_from(["blockmirrord", "--volume-inflight-mib", "0"]).is_err());
        assert_eq!(c.trace_slow_write(), Some(Duration::from_millis(50)));
        assert_eq!(c.metrics_listen, None);
        let c = Config::try_parse_from([
            "blockmirrord",
            "--trace-write-sample-ratio",
            "1",
            "--trace-slow-write-ms",
            "0",
            "--metrics-listen",
            "127.0.0.1:9464",
        ])
        .unwrap();
        assert!((c.trace_write_sample_ratio - 1.0).abs() < f64::EPSILON);
        assert_eq!(c.trace_slow_write(), None);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    }

    #[test]
    fn bad_flags_are_rejected() {
        for args in [
            vec!["blockmirrord", "--listen", "http://x"],
            vec!["blockmirrord", "--listen", "tcp:localhost"],
            vec!["blockmirrord", "--listen", "unix:"],
            vec!["blockmirrord", "--event-history", "0"],
            vec!["blockmirrord", "--bogus"],
            vec!["blockmirrord", "--trace-write-sample-ratio", "2.0"],
            vec!["blockmirrord", "--trace-write-sample-ratio", "-0.1"],
            vec!["blockmirrord", "--trace-write-sample-ratio", "NaN"],
            vec!["blockmirrord", "--trace-slow-write-ms", "x"],
            vec!["blockmirrord", "--metrics-listen", "localhost:9464"],
            vec!["blockmirrord", "--metrics-listen", "9464"],
        ] {
            assert!(Config::try_parse_from(&args).is_err(), "{args:?}");
        }
    }
}
