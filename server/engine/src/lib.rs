//! The blockmirror engine: volumes, backends, dirty bitmaps, range locks,
//! mirror jobs, the event log and the state store. It knows nothing of gRPC,
//! NBD or the command line; the server crate adapts it to those.
//!
//! # Layout
//!
//! - [`engine`]: the registry of volumes and jobs, and the entry points.
//! - [`volume`]: a named device and the guest I/O path into it.
//! - [`job`]: mirror jobs — spec, life cycle, the shared write-path state
//!   (`job::active`), the convergence policy (`job::policy`) and the runner
//!   that copies.
//! - [`bitmap`]: the hierarchical dirty bitmap.
//! - [`rangelock`]: byte-range locks between guest writes and copies.
//! - [`limits`]: the byte budget that bounds a job's memory.
//! - [`throttle`]: token-bucket rate limits.
//! - [`observe`]: I/O and job records for an observer (telemetry), and
//!   per-job write latency histograms.
//! - [`latency`]: the lock-free log-bucketed latency histogram.
//! - [`backend`]: block backends (raw file / block device, optionally
//!   `O_DIRECT`, remote NBD export, memory).
//! - [`aligned`]: page-aligned buffers for direct I/O.
//! - [`device`]: async access to a backend (inline cached reads, the
//!   short-I/O pool, or tokio's blocking pool).
//! - [`events`]: the numbered event log with replay.
//! - [`store`]: the state directory.
//! - `definitions`: the volume definitions on disk, and a pivot's written
//!   ahead of its pause.
//! - [`names`]: name validation.
//! - [`error`]: the engine's error type.
// Audited exceptions: `preadv2`/`pwritev2` with flags in backend/file.rs,
// `statx` in backend/direct.rs.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod aligned;
pub mod backend;
pub mod bitmap;
pub mod bufpool;
mod definitions;
pub mod device;
pub mod engine;
pub mod error;
pub mod events;
mod iopool;
pub mod job;
pub mod latency;
pub mod limits;
pub mod names;
pub mod observe;
pub mod rangelock;
pub mod store;
pub mod throttle;
pub mod volume;

pub use engine::{DEFAULT_VOLUME_INFLIGHT_BYTES, Engine, EngineConfig, VolumeInfo};
pub use error::{EngineError, ErrorKind, Result};
pub use job::JobInfo;
