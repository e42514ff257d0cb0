//! A typed async client for blockmirrord's gRPC API (package
//! `blockmirror.v1`), used by `mirrorctl` and the integration tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), blockmirror_client::ClientError> {
//! use blockmirror_client::{Client, WaitOptions, parse_size};
//!
//! let client = Client::connect("blockmirror-state/blockmirror.sock").await?;
//! client.volumes().create("src", parse_size("1G").unwrap(), None).await?;
//! let job = client.jobs().get("mirror-1").await?;
//! let report = client.wait_from(job, &WaitOptions::ready(), |_view| {}).await?;
//! println!("{:?}", report.outcome);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`endpoint`]: [`Endpoint`], a unix socket path or `http://` URL, and
//!   connecting to it.
//! - [`client`]: [`Client`], one connection, handing out the service
//!   wrappers below.
//! - [`volume`]: [`VolumeClient`], create/attach/list/delete volumes, their
//!   write limits, and their NBD exports.
//! - [`data`]: [`DataClient`], read/write/flush/discard/write-zeroes.
//! - [`job`]: [`JobClient`], start and steer mirror jobs.
//! - [`watch`]: [`WatchClient`], the event stream as [`WatchItem`]s.
//! - [`view`]: [`JobView`], a job's live state folded from events, and
//!   [`JobEnd`], how it finished.
//! - [`wait`]: [`Client::wait_for_job`], waiting for job states.
//! - [`names`]: lowercase names of states, modes, policies and convergence
//!   forecasts, QEMU event names.
//! - [`json`]: the JSON forms of jobs, volumes, exports and events.
//! - [`size`]: [`parse_size`] and [`format_size`] (`64K`, `1.5 GiB`).
//! - [`error`]: the error type, [`ClientError`].
//! - [`trace`]: [`TraceContext`], the caller's W3C trace context sent on
//!   every call.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod client;
pub mod data;
pub mod endpoint;
pub mod error;
pub mod job;
pub mod json;
pub mod names;
pub mod size;
pub mod trace;
pub mod view;
pub mod volume;
pub mod wait;
pub mod watch;

#[cfg(test)]
mod mock;

/// The generated proto types (`blockmirror.v1`).
pub use blockmirror_proto::v1 as proto;

pub use client::Client;
pub use data::DataClient;
pub use endpoint::Endpoint;
pub use error::ClientError;
pub use job::JobClient;
pub use size::{SizeError, format_rate, format_size, parse_size};
pub use trace::TraceContext;
pub use view::{JobEnd, JobView};
pub use volume::{LimitsUpdate, VolumeClient};
pub use wait::{WaitOptions, WaitOutcome, WaitReport};
pub use watch::{EventStream, WatchClient, WatchItem};
