//! The gRPC front end: one service per resource, errors mapped in `status`.

pub mod admission;
mod convert;
mod data;
mod job;
pub mod status;
mod volume;

use blockmirror_engine::Engine;
use blockmirror_proto::v1;
use std::sync::Arc;
use std::time::Duration;
use tonic::service::Routes;

/// Runs an engine call that writes the state directory on the blocking
/// pool: it syncs files, and on a runtime thread that would hold up the
/// guest I/O queued behind it there (a `complete` would pause guests for
/// as long).
async fn off_runtime<T: Send + 'static>(
    engine: &Arc<Engine>,
    call: impl FnOnce(&Engine) -> blockmirror_engine::Result<T> + Send + 'static,
) -> Result<T, tonic::Status> {
    use status::IntoStatus;
    let engine = Arc::clone(engine);
    match tokio::task::spawn_blocking(move || call(&engine)).await {
        Ok(r) => r.status(),
        Err(e) => Err(tonic::Status::internal(format!("request failed: {e}"))),
    }
}

/// Every service (plus health and reflection) on one set of routes.
///
/// # Errors
/// A malformed embedded descriptor set (a build defect).
pub async fn routes(
    engine: Arc<Engine>,
    heartbeat: Duration,
) -> Result<Routes, tonic_reflection::server::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<v1::job_service_server::JobServiceServer<job::JobApi>>()
        .await;
    health_reporter
        .set_serving::<v1::volume_service_server::VolumeServiceServer<volume::VolumeApi>>()
        .await;
    health_reporter
        .set_serving::<v1::data_service_server::DataServiceServer<data::DataApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(blockmirror_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let data = admission::Admission::new(
        v1::data_service_server::DataServiceServer::new(data::DataApi {
            engine: Arc::clone(&engine),
        })
        .max_decoding_message_size(admission::MAX_MESSAGE_BYTES as usize)
        .max_encoding_message_size(admission::MAX_MESSAGE_BYTES as usize),
        admission::DATA_PAYLOAD_BUDGET,
    );
    Ok(Routes::new(health)
        .add_service(reflection)
        .add_service(v1::volume_service_server::VolumeServiceServer::new(
            volume::VolumeApi {
                engine: Arc::clone(&engine),
            },
        ))
        .add_service(data)
        .add_service(v1::job_service_server::JobServiceServer::new(job::JobApi {
            engine,
            heartbeat,
        })))
}
