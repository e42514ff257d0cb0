//! blockmirrord: the blockmirror engine served over gRPC.
//!
//! # Layout
//!
//! - [`config`]: flags and `BLOCKMIRROR_*` environment variables.
//! - [`grpc`]: the tonic services (volumes, data, jobs, events), health and
//!   reflection; engine errors become status codes in `grpc::status`.
//! - [`nbd`]: the NBD server (handshake, transmission, errno mapping).
//! - [`telemetry`]: logs, OpenTelemetry traces and metrics, the Prometheus
//!   endpoint.
//! - [`run`]: binds the listeners, serves until shutdown, then drains.

pub mod config;
pub mod grpc;
pub mod nbd;
pub mod telemetry;

use blockmirror_engine::{Engine, EngineConfig};
use config::{Config, ListenAddr};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state directory or its contents are unusable.
    #[error("opening the state directory")]
    State(#[source] blockmirror_engine::EngineError),
    /// A listener could not be bound.
    #[error("binding {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC routes could not be built.
    #[error("building the gRPC services")]
    Routes(#[source] tonic_reflection::server::Error),
    /// A listener failed while serving.
    #[error("serving gRPC")]
    Serve(#[source] tonic::transport::Error),
    /// Telemetry could not start.
    #[error("starting telemetry")]
    Telemetry(#[source] telemetry::TelemetryError),
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    match UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // A socket file left by a previous run: reuse it only if nobody answers.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another server is listening on this socket",
                ));
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

/// Binds every listener in `addrs`.
///
/// # Errors
/// The first address that cannot be bound.
pub async fn bind(addrs: &[ListenAddr]) -> Result<Vec<Listener>, RunError> {
    let mut out = Vec::new();
    for addr in addrs {
        let err = |source| RunError::Bind {
            addr: addr.to_string(),
            source,
        };
        out.push(match addr {
            ListenAddr::Unix(p) => Listener::Unix(bind_unix(p).map_err(err)?),
            ListenAddr::Tcp(a) => Listener::Tcp(TcpListener::bind(a).await.map_err(err)?),
        });
    }
    Ok(out)
}

/// Opens the engine, serves gRPC on `listeners` and NBD on `nbd_listeners`
/// until `shutdown` resolves, then stops accepting, lets in-flight requests
/// finish, stops the jobs (records saved) and flushes the volumes.
///
/// # Errors
/// See [`RunError`].
pub async fn run(
    config: &Config,
    listeners: Vec<Listener>,
    nbd_listeners: Vec<Listener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let engine = Engine::open(EngineConfig {
        state_dir: config.state_dir.clone(),
        event_history: usize::try_from(config.event_history).unwrap_or(usize::MAX),
        volume_inflight_bytes: config.volume_inflight_bytes(),
    })
    .map_err(RunError::State)?;
    let telemetry = telemetry::Telemetry::start(config, &engine)
        .await
        .map_err(RunError::Telemetry)?;
    // Before serving, so no client sees a resumable job missing; after
    // telemetry, so its copies are observed like any other.
    engine.resume_jobs().await;
    let routes = grpc::routes(Arc::clone(&engine), config.heartbeat())
        .await
        .map_err(RunError::Routes)?;
    let stop = CancellationToken::new();
    let nbd_sessions = tokio_util::task::TaskTracker::new();
    for l in nbd_listeners {
        match &l {
            Listener::Unix(u) => {
                tracing::info!(addr = ?u.local_addr().ok(), "NBD listening (unix)")
            }
            Listener::Tcp(t) => tracing::info!(addr = ?t.local_addr().ok(), "NBD listening (tcp)"),
        }
        nbd_sessions.spawn(nbd::serve(
            l,
            Arc::clone(&engine),
            stop.clone(),
            nbd_sessions.clone(),
        ));
    }
    let mut servers = tokio::task::JoinSet::new();
    for l in listeners {
        let server = match &l {
            Listener::Unix(u) => telemetry::rpc::ServerAddress {
                address: u
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                    .unwrap_or_default(),
                port: None,
            },
            Listener::Tcp(t) => {
                let a = t.local_addr().ok();
                telemetry::rpc::ServerAddress {
                    address: a.map(|a| a.ip().to_string()).unwrap_or_default(),
                    port: a.map(|a| a.port()),
                }
            }
        };
        // Flow-control windows sized for the data budget (see `admission`).
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(grpc::admission::HTTP2_MAX_STREAMS)
            .initial_stream_window_size(grpc::admission::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(grpc::admission::HTTP2_CONNECTION_WINDOW)
            // A peer that is gone (not just slow) releases what it holds.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .layer(tower::util::option_layer(telemetry.rpc_layer(server)))
            .add_routes(routes.clone());
        let stop = stop.clone();
        match l {
            Listener::Unix(u) => {
                tracing::info!(addr = ?u.local_addr().ok(), "gRPC listening (unix)");
                servers.spawn(router.serve_with_incoming_shutdown(
                    UnixListenerStream::new(u),
                    stop.cancelled_owned(),
                ));
            }
            Listener::Tcp(t) => {
                tracing::info!(addr = ?t.local_addr().ok(), "gRPC listening (tcp)");
                servers.spawn(router.serve_with_incoming_shutdown(
                    TcpListenerStream::new(t),
                    stop.cancelled_owned(),
                ));
            }
        }
    }
    let mut failure = None;
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        Some(res) = servers.join_next() => {
            if let Ok(Err(e)) = res {
                failure = Some(RunError::Serve(e));
            }
        }
    }
    // 1. stop accepting; in-flight RPCs (guest I/O) finish.
    stop.cancel();
    let grace = config.shutdown_grace();
    if tokio::time::timeout(grace, async {
        while servers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(?grace, "gRPC connections still open after the grace period");
    }
    // 2. stop jobs, save records, flush volumes.
    engine.shutdown(grace).await;
    for addr in config.listeners().into_iter().chain(config.nbd_listeners()) {
        if let ListenAddr::Unix(p) = addr {
            let _ = std::fs::remove_file(p);
        }
    }
    telemetry.shutdown().await;
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}
