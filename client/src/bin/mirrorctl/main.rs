//! `mirrorctl`: the command-line client of blockmirrord, a thin layer over
//! `blockmirror-client`.
//!
//! Exit status: 0 on success, 1 for server and runtime errors (including a
//! wait whose job ended the wrong way or timed out), 2 for usage errors
//! (clap's own, and the few found after parsing). Errors print as one line
//! on stderr: `error: ...` with the whole cause chain.
//!
//! - `cli`: the clap definitions.
//! - `output`: tables, `key: value` lines and JSON for stdout.
//! - `progress`: live progress bars on stderr.
//! - `otel`: the command's own span when the OpenTelemetry variables are set.
#![forbid(unsafe_code)]

mod cli;
mod otel;
mod output;
mod progress;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use blockmirror_client::data::MAX_REQUEST_BYTES;
use blockmirror_client::names::{generate_job_id, job_state_name};
use blockmirror_client::proto::{Job, JobState, MirrorSpec, SyncMode};
use blockmirror_client::{
    Client, ClientError, Endpoint, JobEnd, JobView, LimitsUpdate, TraceContext, WaitOptions,
    WaitOutcome, WaitReport, WatchItem, format_size,
};
use futures::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cli::{
    Cli, Command, DEFAULT_SOCKET, DataCmd, ExportCmd, JobCmd, MirrorCmd, StartArgs, VolumeCmd,
    WaitArg, WatchArgs,
};
use crate::output::Printer;
use crate::progress::Progress;

/// Exit status for usage errors, as clap uses.
const EXIT_USAGE: u8 = 2;
/// Exit status after Ctrl-C (128 + SIGINT), except for `watch`, where
/// interrupting is the normal way to stop.
const EXIT_INTERRUPTED: u8 = 130;

/// A usage error found after parsing: exit status 2.
#[derive(Debug)]
struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = cli::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let is_watch = matches!(cli.command, Command::Watch(_));
    let result = runtime.block_on(async {
        let trace = otel::CliTrace::start(cli.command.name());
        let headers = trace.as_ref().and_then(otel::CliTrace::headers);
        let result = tokio::select! {
            r = run(&cli, headers) => r.map(|()| true),
            () = interrupted() => Ok(false),
        };
        if let Some(trace) = trace {
            trace.end(result.as_ref().err().map(chain_text)).await;
        }
        result
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if is_watch => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_INTERRUPTED),
        Err(e) => report(&e),
    }
}

/// Resolves on Ctrl-C; never, if the handler cannot be installed.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Prints the error once, with its chain, and picks the exit status.
fn report(e: &anyhow::Error) -> ExitCode {
    if let Some(usage) = e.downcast_ref::<UsageError>() {
        eprintln!("error: {usage}");
        return ExitCode::from(EXIT_USAGE);
    }
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        // The reader went away (`mirrorctl watch | head`): not our failure.
        return ExitCode::SUCCESS;
    }
    let hint = e
        .chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .and_then(connect_hint);
    eprintln!("error: {}{}", chain_text(e), hint.unwrap_or_default());
    ExitCode::FAILURE
}

/// The error and its causes on one line, `outer: cause: root`. Some
/// transport errors repeat their source in their own message; a cause the
/// previous message already ends with is left out, so each part prints once.
fn chain_text(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if msg.is_empty() || parts.last().is_some_and(|prev| prev.ends_with(&msg)) {
            continue;
        }
        parts.push(msg);
    }
    parts.join(": ")
}

/// What to suggest when blockmirrord cannot be reached.
fn connect_hint(e: &ClientError) -> Option<String> {
    match e {
        ClientError::Connect {
            endpoint: Endpoint::Unix(path),
            ..
        } => Some(format!(
            "; is blockmirrord running? Start it with `blockmirrord` (default socket \
             {DEFAULT_SOCKET}){}, or point mirrorctl at its socket with --socket PATH \
             or BLOCKMIRROR_SOCKET",
            if path == Path::new(DEFAULT_SOCKET) {
                " in this directory"
            } else {
                ""
            }
        )),
        ClientError::Connect {
            endpoint: Endpoint::Http(_),
            ..
        } => Some(
            "; is blockmirrord running and listening there (blockmirrord --listen tcp:HOST:PORT)?"
                .to_owned(),
        ),
        _ => None,
    }
}

async fn run(cli: &Cli, trace: Option<TraceContext>) -> anyhow::Result<()> {
    let endpoint = match &cli.endpoint {
        Some(url) => Endpoint::parse(url)?,
        None => Endpoint::Unix(cli.socket.clone()),
    };
    let mut client = Client::connect_endpoint(&endpoint).await?;
    if let Some(trace) = trace {
        client = client.with_trace_context(trace);
    }
    let p = Printer { format: cli.output };
    match &cli.command {
        Command::Volume(cmd) => volume(&client, p, cmd).await,
        Command::Export(cmd) => export(&client, p, cmd).await,
        Command::Mirror(MirrorCmd::Start(args)) => mirror_start(&client, p, args).await,
        Command::Job(cmd) => job(&client, p, cmd).await,
        Command::Watch(args) => watch(&client, p, args).await,
        Command::Data(cmd) => data(&client, p, cmd).await,
    }
}

/// A path as the server should see it: absolute (against our working
/// directory) and UTF-8.
fn server_path(path: &Path) -> anyhow::Result<String> {
    let abs =
        std::path::absolute(path).with_context(|| format!("resolving path {}", path.display()))?;
    abs.to_str()
        .map(str::to_owned)
        .ok_or_else(|| UsageError(format!("path {} is not valid UTF-8", abs.display())).into())
}

async fn volume(client: &Client, p: Printer, cmd: &VolumeCmd) -> anyhow::Result<()> {
    let volumes = client.volumes();
    match cmd {
        VolumeCmd::Create { name, size, path } => {
            let path = path.as_deref().map(server_path).transpose()?;
            p.volume(&volumes.create(name, *size, path.as_deref()).await?)?;
        }
        VolumeCmd::Attach {
            name,
            path,
            direct,
            uri,
        } => {
            // clap requires exactly one of --path and --uri.
            let volume = match (path, uri) {
                (Some(path), None) => {
                    let path = server_path(path)?;
                    volumes.attach(name, &path, *direct).await?
                }
                (None, Some(uri)) => volumes.attach_uri(name, uri).await?,
                _ => {
                    return Err(UsageError("give one of --path and --uri".to_owned()).into());
                }
            };
            p.volume(&volume)?;
        }
        VolumeCmd::List => p.volumes(&volumes.list().await?)?,
        VolumeCmd::Show { name } => p.volume(&volumes.get(name).await?)?,
        VolumeCmd::Delete { name } => {
            volumes.delete(name).await?;
            p.done(
                &format!("deleted volume {name}"),
                &json!({ "name": name, "deleted": true }),
            )?;
        }
        VolumeCmd::SetLimits {
            name,
            write_bps,
            write_iops,
        } => {
            let update = LimitsUpdate {
                write_bytes_per_sec: *write_bps,
                write_iops: *write_iops,
            };
            p.volume(&volumes.update_limits(name, update).await?)?;
        }
    }
    Ok(())
}

async fn export(client: &Client, p: Printer, cmd: &ExportCmd) -> anyhow::Result<()> {
    let volumes = client.volumes();
    match cmd {
        ExportCmd::Add {
            volume,
            name,
            read_only,
        } => {
            let export = volumes
                .add_export(volume, name.as_deref(), *read_only)
                .await?;
            p.export(&export)?;
        }
        ExportCmd::List => p.exports(&volumes.list_exports().await?)?,
        ExportCmd::Remove { name } => {
            volumes.remove_export(name).await?;
            p.done(
                &format!("removed export {name}"),
                &json!({ "name": name, "removed": true }),
            )?;
        }
    }
    Ok(())
}

/// The spec `mirror start` sends. Options not given stay unspecified (0 for
/// the convergence policy), so the server's documented defaults apply.
fn mirror_spec(args: &StartArgs) -> MirrorSpec {
    let mut spec = MirrorSpec {
        source_volume: args.source.clone(),
        target: args.target.clone(),
        granularity_bytes: args.granularity.unwrap_or(0),
        buf_size_bytes: args.buf_size.unwrap_or(0),
        speed_bytes_per_sec: args.speed.unwrap_or(0),
        auto_finalize: args.no_auto_finalize.then_some(false),
        auto_dismiss: args.no_auto_dismiss.then_some(false),
        bitmap: args.bitmap.clone().unwrap_or_default(),
        auto_ready_timeout_ms: args.auto_ready_timeout.unwrap_or(0),
        auto_diverging_window_ms: args.auto_diverging_window.unwrap_or(0),
        auto_min_dwell_ms: args.auto_min_dwell.unwrap_or(0),
        target_latency_limit_ms: args.target_latency_limit.unwrap_or(0),
        target_latency_window_ms: args.target_latency_window.unwrap_or(0),
        guest_throttle_bytes_per_sec: args.guest_throttle.unwrap_or(0),
        guest_throttle_below_bytes: args.guest_throttle_below.unwrap_or(0),
        copier_share_percent: args.copier_share.unwrap_or(0),
        copier_time_share_percent: args.copier_time_share.unwrap_or(0),
        ..MirrorSpec::default()
    };
    if let Some(mode) = args.mode {
        spec.set_copy_mode(mode.into());
    }
    let sync = args
        .sync
        .map(SyncMode::from)
        .or_else(|| args.bitmap.as_ref().map(|_| SyncMode::Bitmap));
    if let Some(sync) = sync {
        spec.set_sync(sync);
    }
    if let Some(policy) = args.on_source_error {
        spec.set_on_source_error(policy.into());
    }
    if let Some(policy) = args.on_target_error {
        spec.set_on_target_error(policy.into());
    }
    spec
}

async fn mirror_start(client: &Client, p: Printer, args: &StartArgs) -> anyhow::Result<()> {
    let job_id = args
        .job
        .clone()
        .unwrap_or_else(|| generate_job_id(&args.source));
    let job = client
        .jobs()
        .start_mirror(&job_id, mirror_spec(args))
        .await?;
    match args.wait {
        None => Ok(p.job(&job)?),
        Some(WaitArg::Ready) => {
            wait_and_print(client, p, job, WaitOptions::ready(), Expect::Ready).await
        }
        Some(WaitArg::Done) => {
            wait_and_print(client, p, job, WaitOptions::done(), Expect::Done).await
        }
    }
}

async fn job(client: &Client, p: Printer, cmd: &JobCmd) -> anyhow::Result<()> {
    let jobs = client.jobs();
    match cmd {
        JobCmd::List => p.jobs(&jobs.list().await?)?,
        JobCmd::Show { id } => p.job(&jobs.get(id).await?)?,
        JobCmd::Pause { id } => p.job(&jobs.pause(id).await?)?,
        JobCmd::Resume { id } => p.job(&jobs.resume(id).await?)?,
        JobCmd::SetSpeed { id, rate } => p.job(&jobs.set_speed(id, *rate).await?)?,
        JobCmd::Change { id, mode } => p.job(&jobs.change_mode(id, (*mode).into()).await?)?,
        JobCmd::Complete { id, wait } => {
            let job = jobs.complete(id).await?;
            if *wait {
                return wait_and_print(client, p, job, WaitOptions::done(), Expect::Pivot).await;
            }
            p.job(&job)?;
        }
        JobCmd::Cancel { id, force } => p.job(&jobs.cancel(id, *force).await?)?,
        JobCmd::Finalize { id } => p.job(&jobs.finalize(id).await?)?,
        JobCmd::Dismiss { id } => p.job(&jobs.dismiss(id).await?)?,
        JobCmd::Wait { id, until, timeout } => {
            let first = jobs.get(id).await?;
            let opts = WaitOptions {
                until: until.iter().map(|s| JobState::from(*s)).collect(),
                timeout: *timeout,
            };
            return wait_and_print(client, p, first, opts, Expect::States).await;
        }
    }
    Ok(())
}

/// What a successful wait means to the command that waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `--wait ready`: the job became ready.
    Ready,
    /// `--wait done`: the job finished without error or cancel.
    Done,
    /// `job complete --wait`: the job finished and pivoted.
    Pivot,
    /// `job wait --until`: the job reached one of the states.
    States,
}

/// Waits with a progress bar, prints the job as last seen, and fails if
/// the wait did not end as `expect` wants.
async fn wait_and_print(
    client: &Client,
    p: Printer,
    first: Job,
    opts: WaitOptions,
    expect: Expect,
) -> anyhow::Result<()> {
    let mut progress = Progress::new();
    let report = client
        .wait_from(first, &opts, |view| progress.update(view))
        .await;
    progress.clear();
    let report = report?;
    p.job(&report.job)?;
    match wait_failure(&report, &opts, expect) {
        Some(msg) => Err(anyhow::Error::msg(msg)),
        None => Ok(()),
    }
}

/// Why a finished wait counts as a failure, if it does.
fn wait_failure(report: &WaitReport, opts: &WaitOptions, expect: Expect) -> Option<String> {
    let id = &report.view.id;
    let states = opts
        .until
        .iter()
        .map(|s| job_state_name(*s))
        .collect::<Vec<_>>()
        .join(",");
    match &report.outcome {
        WaitOutcome::TimedOut => Some(format!(
            "timed out after {}s waiting for job {id} to reach {states} (it is {})",
            opts.timeout.unwrap_or_default().as_secs_f64(),
            report.view.state_name()
        )),
        WaitOutcome::Ended(end) => Some(match expect {
            Expect::Ready => format!("job {id} ended before it became ready: {end}"),
            Expect::Done | Expect::Pivot | Expect::States => {
                format!("job {id} ended without reaching {states}: {end}")
            }
        }),
        WaitOutcome::Reached(_) => match (expect, &report.view.end) {
            (Expect::Done | Expect::Pivot, Some(end)) if !end.is_success() => {
                Some(format!("job {id} {end}"))
            }
            (Expect::Pivot, Some(JobEnd::Completed { pivoted: false })) => Some(format!(
                "job {id} completed without pivot (it was cancelled in ready state)"
            )),
            _ => None,
        },
    }
}

async fn watch(client: &Client, p: Printer, args: &WatchArgs) -> anyhow::Result<()> {
    let mut stream = client.watch().events(args.id.as_deref(), args.from).await?;
    let mut progress = Progress::new();
    let mut views: HashMap<String, JobView> = HashMap::new();
    while let Some(item) = stream.next().await {
        let item = item?;
        if let Some(line) = p.watch_line(&item) {
            progress.suspend(|| output::out(&line))?;
        }
        let view = match &item {
            WatchItem::Snapshot(job) => {
                let view = views
                    .entry(job.id.clone())
                    .or_insert_with(|| JobView::from_job(job));
                view.apply_job(job);
                view
            }
            WatchItem::Event(ev) => {
                let view = views.entry(ev.job_id.clone()).or_insert_with(|| {
                    JobView::from_job(&Job {
                        id: ev.job_id.clone(),
                        ..Job::default()
                    })
                });
                view.apply_event(ev);
                view
            }
            WatchItem::Heartbeat { .. } => continue,
        };
        progress.update(view);
        if view.is_finished() {
            let id = view.id.clone();
            views.remove(&id);
        }
    }
    Ok(())
}

async fn data(client: &Client, p: Printer, cmd: &DataCmd) -> anyhow::Result<()> {
    let data = client.data();
    // MAX_REQUEST_BYTES is 1 MiB: it fits usize.
    let step = usize::try_from(MAX_REQUEST_BYTES).unwrap_or(usize::MAX);
    match cmd {
        DataCmd::Write {
            volume,
            offset,
            file,
            pattern,
            length,
            fua,
        } => {
            let mut at = *offset;
            let mut written = 0u64;
            if let Some(path) = file {
                let mut f = tokio::fs::File::open(path)
                    .await
                    .with_context(|| format!("opening {}", path.display()))?;
                let mut buf = vec![0u8; step];
                loop {
                    let n = read_full(&mut f, &mut buf)
                        .await
                        .with_context(|| format!("reading {}", path.display()))?;
                    if n == 0 {
                        break;
                    }
                    data.write(volume, at, buf[..n].to_vec(), *fua).await?;
                    let n = u64::try_from(n)?;
                    at = at.checked_add(n).context("offset past 2^64")?;
                    written += n;
                }
            } else if let (Some(byte), Some(length)) = (pattern, length) {
                let chunk =
                    bytes::Bytes::from(vec![
                        *byte;
                        usize::try_from((*length).min(MAX_REQUEST_BYTES))?
                    ]);
                while written < *length {
                    let n = (*length - written).min(MAX_REQUEST_BYTES);
                    data.write(volume, at, chunk.slice(..usize::try_from(n)?), *fua)
                        .await?;
                    at = at.checked_add(n).context("offset past 2^64")?;
                    written += n;
                }
            }
            p.done(
                &format!(
                    "wrote {} to {volume} at offset {offset}",
                    bytes_text(written)
                ),
                &json!({ "volume": volume, "op": "write", "offset": offset, "length": written }),
            )?;
        }
        DataCmd::Read {
            volume,
            offset,
            length,
            out,
        } => {
            let mut file = match out {
                Some(path) => Some(
                    tokio::fs::File::create(path)
                        .await
                        .with_context(|| format!("creating {}", path.display()))?,
                ),
                None => None,
            };
            let mut done = 0u64;
            while done < *length {
                let n = (*length - done).min(MAX_REQUEST_BYTES);
                let at = offset.checked_add(done).context("offset past 2^64")?;
                let bytes = data.read_once(volume, at, n).await?;
                match (&mut file, out) {
                    (Some(f), Some(path)) => f
                        .write_all(&bytes)
                        .await
                        .with_context(|| format!("writing {}", path.display()))?,
                    _ => write_stdout(&bytes)?,
                }
                done += n;
            }
            if let (Some(mut f), Some(path)) = (file, out) {
                f.flush()
                    .await
                    .with_context(|| format!("writing {}", path.display()))?;
                p.done(
                    &format!(
                        "read {} from {volume} at offset {offset} into {}",
                        bytes_text(done),
                        path.display()
                    ),
                    &json!({
                        "volume": volume, "op": "read", "offset": offset, "length": done,
                        "out": path.display().to_string(),
                    }),
                )?;
            }
        }
        DataCmd::Flush { volume } => {
            data.flush(volume).await?;
            p.done(
                &format!("flushed {volume}"),
                &json!({ "volume": volume, "op": "flush" }),
            )?;
        }
        DataCmd::Discard {
            volume,
            offset,
            length,
        } => {
            data.discard(volume, *offset, *length).await?;
            p.done(
                &format!(
                    "discarded {} of {volume} at offset {offset}",
                    bytes_text(*length)
                ),
                &json!({ "volume": volume, "op": "discard", "offset": offset, "length": length }),
            )?;
        }
        DataCmd::WriteZeroes {
            volume,
            offset,
            length,
            no_hole,
        } => {
            data.write_zeroes(volume, *offset, *length, *no_hole)
                .await?;
            p.done(
                &format!(
                    "zeroed {} of {volume} at offset {offset}",
                    bytes_text(*length)
                ),
                &json!({
                    "volume": volume, "op": "write-zeroes", "offset": offset, "length": length,
                    "no_hole": no_hole,
                }),
            )?;
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
async fn read_full(f: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    std::io::stdout().lock().write_all(bytes)
}

/// `4096 bytes (4 KiB)`.
fn bytes_text(n: u64) -> String {
    if n < 1024 {
        format!("{n} bytes")
    } else {
        format!("{n} bytes ({})", format_size(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_client::proto::{CopyMode, ErrorPolicy};

    fn report(outcome: WaitOutcome, end: Option<JobEnd>, state: JobState) -> WaitReport {
        let mut job = Job {
            id: "j1".into(),
            ..Job::default()
        };
        job.set_state(state);
        let mut view = JobView::from_job(&job);
        view.end = end;
        WaitReport { outcome, view, job }
    }

    #[test]
    fn wait_failures() {
        let ready = WaitOptions::ready();
        let done = WaitOptions::done();
        let r = report(WaitOutcome::Reached(JobState::Ready), None, JobState::Ready);
        assert_eq!(wait_failure(&r, &ready, Expect::Ready), None);

        let r = report(
            WaitOutcome::Ended(JobEnd::Cancelled),
            Some(JobEnd::Cancelled),
            JobState::Concluded,
        );
        assert_eq!(
            wait_failure(&r, &ready, Expect::Ready).as_deref(),
            Some("job j1 ended before it became ready: cancelled")
        );

        let failed = JobEnd::Failed {
            error: "EIO".into(),
        };
        let r = report(
            WaitOutcome::Reached(JobState::Concluded),
            Some(failed),
            JobState::Concluded,
        );
        assert_eq!(
            wait_failure(&r, &done, Expect::Done).as_deref(),
            Some("job j1 failed: EIO")
        );

        let no_pivot = Some(JobEnd::Completed { pivoted: false });
        let r = report(
            WaitOutcome::Reached(JobState::Concluded),
            no_pivot,
            JobState::Concluded,
        );
        assert_eq!(wait_failure(&r, &done, Expect::Done), None);
        assert!(wait_failure(&r, &done, Expect::Pivot).is_some());

        // Auto-dismissed before we saw the end: done.
        let r = report(
            WaitOutcome::Reached(JobState::Null),
            Some(JobEnd::Gone),
            JobState::Null,
        );
        assert_eq!(wait_failure(&r, &done, Expect::Pivot), None);

        let timed = WaitOptions {
            until: vec![JobState::Paused, JobState::Ready],
            timeout: Some(std::time::Duration::from_secs(3)),
        };
        let r = report(WaitOutcome::TimedOut, None, JobState::Running);
        assert_eq!(
            wait_failure(&r, &timed, Expect::States).as_deref(),
            Some("timed out after 3s waiting for job j1 to reach paused,ready (it is running)")
        );
    }

    #[test]
    fn spec_from_flags() {
        let cli = cli::parse_from([
            "mirrorctl",
            "mirror",
            "start",
            "src",
            "--target",
            "volume:dst",
            "--mode",
            "auto",
            "--bitmap",
            "b0",
            "--speed",
            "10M",
            "--on-target-error",
            "ignore",
            "--no-auto-dismiss",
        ])
        .unwrap();
        let Command::Mirror(MirrorCmd::Start(args)) = cli.command else {
            panic!()
        };
        let spec = mirror_spec(&args);
        assert_eq!(spec.source_volume, "src");
        assert_eq!(spec.target, "volume:dst");
        assert_eq!(spec.copy_mode(), CopyMode::Auto);
        assert_eq!(spec.sync(), SyncMode::Bitmap);
        assert_eq!(spec.bitmap, "b0");
        assert_eq!(spec.speed_bytes_per_sec, 10 << 20);
        assert_eq!(spec.on_target_error(), ErrorPolicy::Ignore);
        assert_eq!(spec.on_source_error(), ErrorPolicy::Unspecified);
        assert_eq!(spec.auto_finalize, None);
        assert_eq!(spec.auto_dismiss, Some(false));
        assert_eq!(spec.granularity_bytes, 0);
        // Convergence options not given: 0 = the server's defaults.
        assert_eq!(
            (
                spec.auto_ready_timeout_ms,
                spec.auto_diverging_window_ms,
                spec.auto_min_dwell_ms,
                spec.target_latency_limit_ms,
                spec.target_latency_window_ms,
                spec.guest_throttle_bytes_per_sec,
                spec.guest_throttle_below_bytes,
                spec.copier_share_percent,
                spec.copier_time_share_percent,
            ),
            (0, 0, 0, 0, 0, 0, 0, 0, 0)
        );
    }

    #[test]
    fn spec_convergence_policy_from_flags() {
        let cli = cli::parse_from([
            "mirrorctl",
            "mirror",
            "start",
            "src",
            "--target",
            "volume:dst",
            "--mode",
            "auto",
            "--auto-ready-timeout",
            "90",
            "--auto-diverging-window",
            "2.5",
            "--auto-min-dwell",
            "0.5",
            "--target-latency-limit",
            "40",
            "--target-latency-window",
            "3",
            "--guest-throttle",
            "20M",
            "--guest-throttle-below",
            "128M",
            "--copier-share",
            "50",
            "--copier-time-share",
            "25",
        ])
        .unwrap();
        let Command::Mirror(MirrorCmd::Start(args)) = cli.command else {
            panic!()
        };
        let spec = mirror_spec(&args);
        assert_eq!(spec.auto_ready_timeout_ms, 90_000);
        assert_eq!(spec.auto_diverging_window_ms, 2_500);
        assert_eq!(spec.auto_min_dwell_ms, 500);
        assert_eq!(spec.target_latency_limit_ms, 40);
        assert_eq!(spec.target_latency_window_ms, 3_000);
        assert_eq!(spec.guest_throttle_bytes_per_sec, 20 << 20);
        assert_eq!(spec.guest_throttle_below_bytes, 128 << 20);
        assert_eq!(spec.copier_share_percent, 50);
        assert_eq!(spec.copier_time_share_percent, 25);
    }

    #[test]
    fn chain_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(io)
            .context("tcp connect error: no such file")
            .context("tcp connect error: no such file")
            .context("cannot connect");
        assert_eq!(
            chain_text(&e),
            "cannot connect: tcp connect error: no such file"
        );
    }

    #[test]
    fn connect_hint_names_the_socket() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(Client::connect("/nonexistent/bm.sock"))
            .unwrap_err();
        let hint = connect_hint(&err).expect("a connect error gets a hint");
        assert!(
            hint.contains("--socket") && hint.contains("blockmirrord"),
            "{hint}"
        );
        assert_eq!(
            connect_hint(&ClientError::from(tonic::Status::not_found("x"))),
            None
        );
    }
}
