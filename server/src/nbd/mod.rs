//! The NBD front end: listeners and sessions. Like the gRPC data service it
//! is an adapter over the engine's volumes; neither calls the other.

pub mod errno;
pub mod session;

use crate::Listener;
use blockmirror_engine::Engine;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts connections on `listener` until `shutdown`; every session runs
/// on `tracker` so shutdown can wait for in-flight requests.
pub async fn serve(
    listener: Listener,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok(conn) => {
                let (engine, shutdown) = (Arc::clone(&engine), shutdown.clone());
                tracker.spawn(async move {
                    match conn {
                        Conn::Unix(s, peer) => session::serve(s, engine, peer, shutdown).await,
                        Conn::Tcp(s, peer) => session::serve(s, engine, peer, shutdown).await,
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: log, back off briefly, keep serving.
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream, String),
    Tcp(tokio::net::TcpStream, String),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    match l {
        Listener::Unix(u) => {
            let (s, _) = u.accept().await?;
            Ok(Conn::Unix(s, "unix".into()))
        }
        Listener::Tcp(t) => {
            let (s, peer) = t.accept().await?;
            s.set_nodelay(true)?;
            Ok(Conn::Tcp(s, peer.to_string()))
        }
    }
}
