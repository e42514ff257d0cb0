//! The command line of `mirrorctl` (clap derive). The forms follow the CLI
//! contract in DESIGN.md; tests and scripts rely on them.

use std::path::PathBuf;
use std::time::Duration;

use blockmirror_client::parse_size;
use blockmirror_client::proto::{CopyMode, ErrorPolicy, JobState, SyncMode};
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgGroup, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// The server's default socket: STATE/blockmirror.sock with the default
/// state directory ./blockmirror-state.
pub(crate) const DEFAULT_SOCKET: &str = "blockmirror-state/blockmirror.sock";

const SIZES_HELP: &str = "\
SIZE and RATE are bytes (RATE: bytes per second): a plain number, or one with a
binary suffix K, M, G or T (x1024, x1024^2, x1024^3, x1024^4), case-insensitive,
optionally followed by B or iB: 4096, 64K, 64KiB, 1M, 2G, 1.5G.";

const TARGET_HELP: &str = "\
TARGET is passed to blockmirrord as given:
  volume:NAME                      a volume blockmirrord already has
  file:PATH                        a raw file or block device (path as the server sees it)
  nbd://HOST[:PORT]/EXPORT         a remote NBD export over TCP (default port 10809)
  nbd+unix:///EXPORT?socket=PATH   a remote NBD export on a unix socket (path as the server sees it)
The server decides which forms it supports and answers INVALID_ARGUMENT for the others.";

const CONVERGENCE_HELP: &str = "\
Convergence: a background copy finishes only if the copier outruns the guests.
  Auto mode (--mode auto) starts in background mode, where guests pay nothing
  for the copy, and switches to write-blocking, which always converges, when
  the job would not converge: no READY within --auto-ready-timeout [60s], or
  guests re-dirtying at least 3/4 of what the copier can clean (or touching
  distinct chunks that fast, or the dirty set not shrinking) for
  --auto-diverging-window [0.1s]. After READY it returns to background
  once guests have written at under half the copy rate for 3 s, so they
  stop paying target latency. No automatic switch comes sooner than
  --auto-min-dwell [10s] after the previous one, and the dwell doubles (up
  to 10 min) each time a return to background diverges again: a steady heavy
  load stays write-blocking instead of flapping. The --auto-* options also
  count after `job change --mode auto`.

  Target-latency guard (off by default; write-blocking and auto jobs): when
  synchronous target writes take longer than --target-latency-limit MS for most
  of a --target-latency-window [2s], the job falls back to background (the
  copier carries the chunks) and retries write-blocking after the dwell time,
  which doubles each time the guard trips again.

  Guest throttling (off by default): with --guest-throttle RATE, once a job in
  background mode has fewer dirty bytes than --guest-throttle-below [64M], guest
  writes are capped at RATE until READY, so the copier catches up. The
  trade-off: guests give up write bandwidth for the last stretch, for a job
  that finishes instead of chasing guests that write as fast as it copies.

  Guests first: while guests write, the copier keeps --copier-share [80]
  percent of the target's write limit (synchronous guest writes take the rest
  ahead of bulk copy), and spends at most --copier-time-share [50] percent of
  the time on copy I/O (it rests between operations, which leaves CPU, page
  cache and disks to guests when the target is fast); when guests are idle it
  takes everything. Lower shares serve guests better and converge later: on a
  saturated slow target READY takes about size / (share x bandwidth).";

const NBD_URI_HELP: &str = "\
NBD_URI names a remote NBD export; blockmirrord connects to it:
  nbd://HOST[:PORT]/EXPORT         over TCP (default port 10809)
  nbd+unix:///EXPORT?socket=PATH   on a unix socket (path as the server sees it)";

const EXPORT_HELP: &str = "\
NBD clients (qemu-nbd, nbd-client, qemu-img, nbdcopy) connect to an export with
  nbd+unix:///EXPORT?socket=STATE_DIR/nbd.sock
by default, or at the server's --nbd-listen address: nbd+unix:///EXPORT?socket=PATH
for unix:PATH, nbd://HOST:PORT/EXPORT for tcp:HOST:PORT.";

/// Control blockmirrord: volumes, live mirror jobs, their events, and guest
/// I/O through the engine.
#[derive(Debug, Parser)]
#[command(name = "mirrorctl", version, after_help = SIZES_HELP)]
pub(crate) struct Cli {
    /// Unix socket of blockmirrord's gRPC API.
    #[arg(
        long,
        global = true,
        env = "BLOCKMIRROR_SOCKET",
        value_name = "PATH",
        default_value = DEFAULT_SOCKET
    )]
    pub(crate) socket: PathBuf,

    /// Talk to blockmirrord over TCP instead of the unix socket:
    /// http://HOST:PORT. Conflicts with --socket on the command line; over
    /// BLOCKMIRROR_SOCKET it wins.
    #[arg(long, global = true, env = "BLOCKMIRROR_ENDPOINT", value_name = "URL")]
    pub(crate) endpoint: Option<String>,

    /// Output format: aligned tables and `key: value` lines, or JSON (one
    /// object, an array for lists, one object per line for `watch`).
    #[arg(
        short = 'o',
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value_t = OutputFormat::Table
    )]
    pub(crate) output: OutputFormat,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Parses the command line. `--socket` and `--endpoint` conflict only when
/// both are on the command line; a flag beats the other's environment
/// variable, and BLOCKMIRROR_ENDPOINT beats BLOCKMIRROR_SOCKET. (clap's
/// `conflicts_with` would also count values from the environment.)
///
/// # Errors
///
/// clap's usage errors (exit status 2 through `clap::Error::exit`).
pub(crate) fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let on_command_line = |id| matches.value_source(id) == Some(ValueSource::CommandLine);
    if on_command_line("socket") {
        if on_command_line("endpoint") {
            return Err(Cli::command().error(
                ErrorKind::ArgumentConflict,
                "the argument '--socket <PATH>' cannot be used with '--endpoint <URL>'",
            ));
        }
        cli.endpoint = None;
    }
    Ok(cli)
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    /// Human-readable tables and `key: value` lines.
    Table,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Manage volumes, the block devices blockmirrord owns.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Export volumes over NBD, so guests and tools can use them.
    #[command(subcommand, after_help = EXPORT_HELP)]
    Export(ExportCmd),
    /// Start mirror jobs.
    #[command(subcommand)]
    Mirror(MirrorCmd),
    /// Inspect and steer mirror jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// Print job events as they happen, one per line, until interrupted or
    /// the server closes the stream. Starts with a snapshot of the jobs.
    Watch(WatchArgs),
    /// Guest I/O on a volume through the engine's write path (for tests and
    /// tools; guests normally use NBD).
    #[command(subcommand)]
    Data(DataCmd),
}

impl Command {
    /// The subcommand's name, for the command's span.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Volume(_) => "volume",
            Self::Export(_) => "export",
            Self::Mirror(_) => "mirror",
            Self::Job(_) => "job",
            Self::Watch(_) => "watch",
            Self::Data(_) => "data",
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create a new sparse raw file and register it as a volume.
    #[command(after_help = SIZES_HELP)]
    Create {
        /// Name of the new volume.
        name: String,
        /// Size of the volume (SIZE, e.g. 64M, 10G).
        #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
        size: u64,
        /// Where to create the file (made absolute against the current
        /// directory); default: STATE_DIR/volumes/NAME.raw on the server.
        #[arg(long, value_name = "FILE")]
        path: Option<PathBuf>,
    },
    /// Register an existing raw file or block device, or a remote NBD
    /// export, as a volume.
    #[command(after_help = NBD_URI_HELP)]
    Attach {
        /// Name of the volume.
        name: String,
        /// The file or block device (made absolute against the current
        /// directory).
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "uri",
            conflicts_with = "uri"
        )]
        path: Option<PathBuf>,
        /// Open it with O_DIRECT: no host page cache, so a guest's flush
        /// waits only on the device's cache. Any byte range may still be
        /// written (unaligned writes cost a read-modify-write of their
        /// edge blocks); the size must be a multiple of the device's
        /// direct-I/O block. A mirror's new file target is opened the same
        /// way. Only with --path.
        #[arg(long, conflicts_with = "uri")]
        direct: bool,
        /// A remote NBD export instead of a file (passed to the server as
        /// given): nbd://HOST[:PORT]/EXPORT or
        /// nbd+unix:///EXPORT?socket=PATH.
        #[arg(long, value_name = "NBD_URI")]
        uri: Option<String>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show {
        /// Volume name.
        name: String,
    },
    /// Forget a volume (its file stays). Refused while a job uses it.
    Delete {
        /// Volume name.
        name: String,
    },
    /// Set write limits (like QEMU throttle groups); 0 = unlimited. A limit
    /// not given keeps its current value.
    #[command(
        after_help = SIZES_HELP,
        group(ArgGroup::new("limits").required(true).multiple(true).args(["write_bps", "write_iops"]))
    )]
    SetLimits {
        /// Volume name.
        name: String,
        /// Write bandwidth limit (RATE, e.g. 20M = 20 MiB/s).
        #[arg(long, value_name = "RATE", value_parser = parse_size, allow_hyphen_values = true)]
        write_bps: Option<u64>,
        /// Write operations per second.
        #[arg(long, value_name = "N")]
        write_iops: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ExportCmd {
    /// Export a volume over NBD and print the export. Idempotent: the same
    /// volume, name and --read-only again return the existing export.
    #[command(after_help = EXPORT_HELP)]
    Add {
        /// The volume to export.
        volume: String,
        /// Export name clients ask for; default: the volume's name.
        #[arg(long, value_name = "EXPORT")]
        name: Option<String>,
        /// Refuse writes, trims and write-zeroes from NBD clients.
        #[arg(long)]
        read_only: bool,
    },
    /// List NBD exports.
    #[command(after_help = EXPORT_HELP)]
    List,
    /// Remove an NBD export: new connections are refused; open ones finish
    /// the requests they have in flight.
    Remove {
        /// Export name.
        #[arg(value_name = "EXPORT")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MirrorCmd {
    /// Start mirroring a volume to a target while guests keep using it, and
    /// print the job. Idempotent: the same --job with the same options
    /// returns the existing job.
    #[command(
        after_help = format!("{TARGET_HELP}\n\n{SIZES_HELP}"),
        after_long_help = format!("{TARGET_HELP}\n\n{CONVERGENCE_HELP}\n\n{SIZES_HELP}")
    )]
    Start(StartArgs),
}

#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    /// The volume to copy.
    #[arg(value_name = "SOURCE_VOLUME")]
    pub(crate) source: String,
    /// Where to copy it (TARGET: volume:NAME, file:PATH,
    /// nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH); the
    /// server decides which forms it supports.
    #[arg(long, value_name = "TARGET")]
    pub(crate) target: String,
    /// Job id; default: mirror-SOURCE-UNIXMILLIS.
    #[arg(long = "job", value_name = "ID")]
    pub(crate) job: Option<String>,
    /// Copy mode; default: background.
    #[arg(long, value_enum, value_name = "MODE")]
    pub(crate) mode: Option<ModeArg>,
    /// What to copy; default: full (bitmap if --bitmap is given).
    #[arg(long, value_enum, value_name = "SYNC")]
    pub(crate) sync: Option<SyncArg>,
    /// Named dirty bitmap to copy from (implies --sync bitmap).
    #[arg(long, value_name = "NAME", required_if_eq("sync", "bitmap"))]
    pub(crate) bitmap: Option<String>,
    /// Dirty-tracking chunk size, a power of two from 4K to 64M (SIZE);
    /// default 64K.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub(crate) granularity: Option<u64>,
    /// Bound on bytes the job holds in flight (SIZE); default 16M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub(crate) buf_size: Option<u64>,
    /// Copy rate limit (RATE); default 0 = unlimited.
    #[arg(long, value_name = "RATE", value_parser = parse_size, allow_hyphen_values = true)]
    pub(crate) speed: Option<u64>,
    /// What to do when reading the source fails; default: report.
    #[arg(long, value_enum, value_name = "POLICY")]
    pub(crate) on_source_error: Option<PolicyArg>,
    /// What to do when writing the target fails; default: report.
    #[arg(long, value_enum, value_name = "POLICY")]
    pub(crate) on_target_error: Option<PolicyArg>,
    /// Stop in state pending after completion until `job finalize`.
    #[arg(long)]
    pub(crate) no_auto_finalize: bool,
    /// Stay in state concluded until `job dismiss`.
    #[arg(long)]
    pub(crate) no_auto_dismiss: bool,
    /// Wait until the job is ready (fails if it ends first) or done
    /// (concluded or dismissed; fails if it was cancelled or failed), with
    /// a progress bar on a terminal.
    #[arg(long, value_enum, value_name = "UNTIL")]
    pub(crate) wait: Option<WaitArg>,
    /// Auto mode: switch to write-blocking when not ready after SECS
    /// (fractions allowed); default 60.
    #[arg(
        long,
        value_name = "SECS",
        value_parser = parse_policy_secs,
        allow_hyphen_values = true,
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) auto_ready_timeout: Option<u64>,
    /// Auto mode: switch to write-blocking when the copy has not been
    /// converging for SECS (guests re-dirty or touch chunks at 3/4 of what
    /// the copier can clean, or the dirty set does not shrink); default 0.1.
    #[arg(
        long,
        value_name = "SECS",
        value_parser = parse_policy_secs,
        allow_hyphen_values = true,
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) auto_diverging_window: Option<u64>,
    /// Least time between two automatic mode switches, in SECS; doubles
    /// each time a return to background diverges again; default 10.
    #[arg(
        long,
        value_name = "SECS",
        value_parser = parse_policy_secs,
        allow_hyphen_values = true,
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) auto_min_dwell: Option<u64>,
    /// Target-latency guard: fall back to background when synchronous target
    /// writes take longer than MS milliseconds for most of a window, and
    /// retry write-blocking after the dwell; default 0 = off.
    #[arg(
        long,
        value_name = "MS",
        value_parser = parse_millis,
        allow_hyphen_values = true,
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) target_latency_limit: Option<u64>,
    /// The window the target-latency guard judges, in SECS; default 2.
    #[arg(
        long,
        value_name = "SECS",
        value_parser = parse_policy_secs,
        allow_hyphen_values = true,
        requires = "target_latency_limit",
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) target_latency_window: Option<u64>,
    /// Guest throttling: cap guest writes at RATE once dirty bytes fall
    /// under --guest-throttle-below, until ready; default 0 = off.
    #[arg(
        long,
        value_name = "RATE",
        value_parser = parse_size,
        allow_hyphen_values = true,
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) guest_throttle: Option<u64>,
    /// Dirty bytes (SIZE) under which --guest-throttle starts; default 64M.
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_nonzero_size,
        allow_hyphen_values = true,
        requires = "guest_throttle",
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) guest_throttle_below: Option<u64>,
    /// Percent of the target's write limit the copier keeps while guests
    /// write, 1-100; default 80.
    #[arg(
        long,
        value_name = "PERCENT",
        value_parser = clap::value_parser!(u32).range(1..=100),
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) copier_share: Option<u32>,
    /// Percent of the time the copier may spend on copy I/O while guests
    /// write, 1-100; default 50.
    #[arg(
        long,
        value_name = "PERCENT",
        value_parser = clap::value_parser!(u32).range(1..=100),
        help_heading = CONVERGENCE_HEADING
    )]
    pub(crate) copier_time_share: Option<u32>,
}

/// The heading of the convergence options in `mirror start --help`.
const CONVERGENCE_HEADING: &str = "Convergence";

#[derive(Debug, Subcommand)]
pub(crate) enum JobCmd {
    /// List jobs.
    List,
    /// Show one job.
    Show {
        /// Job id.
        id: String,
    },
    /// Pause a job (running -> paused, ready -> standby).
    Pause {
        /// Job id.
        id: String,
    },
    /// Resume a paused job (paused -> running, standby -> ready).
    Resume {
        /// Job id.
        id: String,
    },
    /// Set the copy rate limit; 0 = unlimited.
    #[command(after_help = SIZES_HELP)]
    SetSpeed {
        /// Job id.
        id: String,
        /// New limit (RATE, e.g. 50M).
        #[arg(value_name = "RATE", value_parser = parse_size, allow_hyphen_values = true)]
        rate: u64,
    },
    /// Switch the copy mode of a running job (either direction).
    Change {
        /// Job id.
        id: String,
        /// The new copy mode.
        #[arg(long, value_enum, value_name = "MODE")]
        mode: ModeArg,
    },
    /// Complete a ready job: converge, then switch the source volume to the
    /// target (pivot).
    Complete {
        /// Job id.
        id: String,
        /// Wait until the job has concluded; fails unless it pivoted.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a job. In ready state the target stays a consistent copy,
    /// without pivot.
    Cancel {
        /// Job id.
        id: String,
        /// Cancel at once, even while the job is converging.
        #[arg(long)]
        force: bool,
    },
    /// Finalize a pending job (pending -> concluded), for jobs started with
    /// --no-auto-finalize.
    Finalize {
        /// Job id.
        id: String,
    },
    /// Dismiss a concluded job (concluded -> null), for jobs started with
    /// --no-auto-dismiss.
    Dismiss {
        /// Job id.
        id: String,
    },
    /// Wait until a job is in (or has passed through) one of the given
    /// states, and print it. Fails if the job ends first or on timeout.
    Wait {
        /// Job id.
        id: String,
        /// States to wait for, comma-separated or repeated.
        #[arg(
            long,
            value_enum,
            value_name = "STATE[,STATE]",
            value_delimiter = ',',
            required = true
        )]
        until: Vec<StateArg>,
        /// Give up after this many seconds (fractions allowed); default:
        /// wait for ever.
        #[arg(long, value_name = "SECS", value_parser = parse_secs, allow_hyphen_values = true)]
        timeout: Option<Duration>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Only this job's events (default: all jobs).
    #[arg(value_name = "ID")]
    pub(crate) id: Option<String>,
    /// Replay the events after sequence number SEQ first (e.g. a job's
    /// last_event_sequence); 0 = only new events.
    #[arg(long = "from", value_name = "SEQ", default_value_t = 0)]
    pub(crate) from: u64,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DataCmd {
    /// Write a file's contents, or a repeated byte, at an offset.
    #[command(
        after_help = SIZES_HELP,
        group(ArgGroup::new("source").required(true).args(["file", "pattern"]))
    )]
    Write {
        /// Volume name.
        volume: String,
        /// Byte offset (SIZE).
        #[arg(long, value_name = "N", value_parser = parse_size, allow_hyphen_values = true)]
        offset: u64,
        /// Write this file's contents.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Write this byte (0-255, or hex like 0xab), --length times.
        #[arg(long, value_name = "BYTE", value_parser = parse_byte, requires = "length")]
        pattern: Option<u8>,
        /// Number of pattern bytes (SIZE).
        #[arg(long, value_name = "N", value_parser = parse_size, requires = "pattern")]
        length: Option<u64>,
        /// Force unit access: each request is durable when it returns.
        #[arg(long)]
        fua: bool,
    },
    /// Read a range; raw bytes go to stdout unless --out is given.
    #[command(after_help = SIZES_HELP)]
    Read {
        /// Volume name.
        volume: String,
        /// Byte offset (SIZE).
        #[arg(long, value_name = "N", value_parser = parse_size, allow_hyphen_values = true)]
        offset: u64,
        /// Number of bytes (SIZE).
        #[arg(long, value_name = "N", value_parser = parse_size, allow_hyphen_values = true)]
        length: u64,
        /// Write the bytes to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Make everything written so far durable (on the target too for a
    /// write-blocking job).
    Flush {
        /// Volume name.
        volume: String,
    },
    /// Discard (trim) a range.
    #[command(after_help = SIZES_HELP)]
    Discard {
        /// Volume name.
        volume: String,
        /// Byte offset (SIZE).
        #[arg(long, value_name = "N", value_parser = parse_size, allow_hyphen_values = true)]
        offset: u64,
        /// Number of bytes (SIZE).
        #[arg(long, value_name = "N", value_parser = parse_size, allow_hyphen_values = true)]
        length: u64,
    },
    /// Write zeroes over a range.
    #[command(after_help = SIZES_HELP)]
    WriteZeroes {
        /// Volume name.
        volume: String,
        /// Byte offset (SIZE).
        #[arg(long, value_name = "N", value_parser = parse_size, allow_hyphen_values = true)]
        offset: u64,
        /// Number of bytes (SIZE).
        #[arg(long, value_name = "N", value_parser = parse_size, allow_hyphen_values = true)]
        length: u64,
        /// Keep the range allocated on the backend (no hole punching).
        #[arg(long)]
        no_hole: bool,
    },
}

/// Copy modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ModeArg {
    /// Copy in the background; guest writes mark chunks dirty.
    Background,
    /// Every guest write also goes to the target before it is acknowledged,
    /// so the dirty set only shrinks.
    #[value(alias = "write_blocking")]
    WriteBlocking,
    /// Start in background, switch to write-blocking when the copy would
    /// not converge (the Convergence options tune when).
    Auto,
}

impl From<ModeArg> for CopyMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Background => Self::Background,
            ModeArg::WriteBlocking => Self::WriteBlocking,
            ModeArg::Auto => Self::Auto,
        }
    }
}

/// What a mirror copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SyncArg {
    /// The whole source.
    Full,
    /// Only what is written from now on.
    #[value(name = "none")]
    NoSync,
    /// Only what a named bitmap marks (--bitmap).
    Bitmap,
}

impl From<SyncArg> for SyncMode {
    fn from(s: SyncArg) -> Self {
        match s {
            SyncArg::Full => Self::Full,
            SyncArg::NoSync => Self::None,
            SyncArg::Bitmap => Self::Bitmap,
        }
    }
}

/// Error policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PolicyArg {
    /// Fail the job.
    Report,
    /// Re-mark the chunk dirty and carry on.
    Ignore,
    /// Pause the job.
    Stop,
    /// Pause on ENOSPC, report anything else.
    Enospc,
}

impl From<PolicyArg> for ErrorPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Report => Self::Report,
            PolicyArg::Ignore => Self::Ignore,
            PolicyArg::Stop => Self::Stop,
            PolicyArg::Enospc => Self::Enospc,
        }
    }
}

/// What `mirror start --wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum WaitArg {
    /// The job is ready (converged; it keeps the target in sync).
    Ready,
    /// The job has concluded or was dismissed.
    Done,
}

/// Job states (QEMU's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StateArg {
    /// Recorded, not started.
    Created,
    /// Copying.
    Running,
    /// Paused before ready.
    Paused,
    /// Converged; keeping the target in sync.
    Ready,
    /// Paused while ready.
    Standby,
    /// Completing: waiting to converge.
    Waiting,
    /// Finished, waiting to be finalized.
    Pending,
    /// Cancelling or failing.
    Aborting,
    /// Finished, waiting to be dismissed.
    Concluded,
    /// Dismissed.
    Null,
}

impl From<StateArg> for JobState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Created => Self::Created,
            StateArg::Running => Self::Running,
            StateArg::Paused => Self::Paused,
            StateArg::Ready => Self::Ready,
            StateArg::Standby => Self::Standby,
            StateArg::Waiting => Self::Waiting,
            StateArg::Pending => Self::Pending,
            StateArg::Aborting => Self::Aborting,
            StateArg::Concluded => Self::Concluded,
            StateArg::Null => Self::Null,
        }
    }
}

/// Parses a byte value: decimal `171` or hex `0xab`.
pub(crate) fn parse_byte(s: &str) -> Result<u8, String> {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse::<u8>(),
    };
    parsed.map_err(|_| format!("invalid byte {s:?}: expected 0-255 or hex like 0xab"))
}

/// Parses a timeout in seconds; fractions allowed.
pub(crate) fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid number of seconds {s:?}"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("invalid number of seconds {s:?}: must be finite and not negative"))
}

/// Parses a convergence-policy duration in seconds (fractions allowed) to
/// whole milliseconds, rounded. Refuses 0 and anything under half a
/// millisecond: the proto's 0 means "the server's default", which is what
/// leaving the option out already says.
pub(crate) fn parse_policy_secs(s: &str) -> Result<u64, String> {
    let d = parse_secs(s)?;
    let ms = u64::try_from((d.as_nanos() + 500_000) / 1_000_000)
        .map_err(|_| format!("{s:?} seconds is too long"))?;
    if ms == 0 {
        return Err(format!(
            "{s:?} seconds rounds to 0 ms, which would mean the server's default: give at least \
             0.001, or leave the option out"
        ));
    }
    Ok(ms)
}

/// Parses a whole number of milliseconds.
pub(crate) fn parse_millis(s: &str) -> Result<u64, String> {
    s.trim().parse().map_err(|_| {
        format!("invalid number of milliseconds {s:?}: expected a whole number like 50")
    })
}

/// Parses a SIZE that must not be 0 (where the proto's 0 means "the
/// server's default").
pub(crate) fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(0) => Err(format!(
            "size {s:?} is 0, which would mean the server's default: leave the option out instead"
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_client::names::{copy_mode_name, job_state_name};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        parse_from(std::iter::once("mirrorctl").chain(args.iter().copied()))
    }

    fn ok(args: &[&str]) -> Cli {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn err(args: &[&str]) -> clap::Error {
        match parse(args) {
            Ok(cli) => panic!("{args:?} parsed: {cli:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags() {
        let cli = ok(&["volume", "list"]);
        assert_eq!(cli.output, OutputFormat::Table);
        assert_eq!(cli.endpoint, None);
        let cli = ok(&["-o", "json", "--socket", "/run/bm.sock", "volume", "list"]);
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.socket, PathBuf::from("/run/bm.sock"));
        // Global flags also work after the subcommand.
        let cli = ok(&[
            "job",
            "list",
            "--output",
            "json",
            "--endpoint",
            "http://h:1",
        ]);
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.endpoint.as_deref(), Some("http://h:1"));
        let e = err(&[
            "--socket",
            "a.sock",
            "--endpoint",
            "http://h:1",
            "job",
            "list",
        ]);
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
        let e = err(&[
            "job",
            "list",
            "--socket",
            "a.sock",
            "--endpoint",
            "http://h:1",
        ]);
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
        // --socket on the command line beats an endpoint from anywhere else.
        let cli = ok(&["job", "list", "--socket", "a.sock"]);
        assert_eq!(cli.endpoint, None);
        assert_eq!(cli.socket, PathBuf::from("a.sock"));
        assert_eq!(
            err(&["-o", "yaml", "job", "list"]).kind(),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn default_socket_is_the_servers_default() {
        // Only meaningful without the env twin set.
        if std::env::var_os("BLOCKMIRROR_SOCKET").is_none() {
            assert_eq!(ok(&["job", "list"]).socket, PathBuf::from(DEFAULT_SOCKET));
        }
    }

    #[test]
    fn volume_commands() {
        let cli = ok(&[
            "volume",
            "create",
            "v1",
            "--size",
            "64M",
            "--path",
            "/tmp/v1.raw",
        ]);
        let Command::Volume(VolumeCmd::Create { name, size, path }) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((name.as_str(), size), ("v1", 64 << 20));
        assert_eq!(path, Some(PathBuf::from("/tmp/v1.raw")));

        let cli = ok(&["volume", "attach", "v2", "--path", "/dev/sdb", "--direct"]);
        assert!(matches!(
            cli.command,
            Command::Volume(VolumeCmd::Attach {
                direct: true,
                uri: None,
                ..
            })
        ));
        for uri in [
            "nbd://h:10809/x",
            "nbd://h/x",
            "nbd+unix:///x?socket=/run/nbd.sock",
        ] {
            let cli = ok(&["volume", "attach", "v2", "--uri", uri]);
            let Command::Volume(VolumeCmd::Attach {
                name,
                path: None,
                direct: false,
                uri: Some(got),
            }) = cli.command
            else {
                panic!("{:?}", cli.command)
            };
            assert_eq!((name.as_str(), got.as_str()), ("v2", uri));
        }
        assert_eq!(
            err(&["volume", "attach", "v2", "--uri", "nbd://h/x", "--direct"]).kind(),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            err(&["volume", "attach", "v2"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&[
                "volume",
                "attach",
                "v2",
                "--path",
                "f",
                "--uri",
                "nbd://h/x"
            ])
            .kind(),
            ErrorKind::ArgumentConflict
        );

        ok(&["volume", "list"]);
        ok(&["volume", "show", "v1"]);
        ok(&["volume", "delete", "v1"]);
        let cli = ok(&["volume", "set-limits", "v1", "--write-bps", "20M"]);
        assert!(matches!(
            cli.command,
            Command::Volume(VolumeCmd::SetLimits {
                write_bps: Some(0x0140_0000),
                write_iops: None,
                ..
            })
        ));
        ok(&[
            "volume",
            "set-limits",
            "v1",
            "--write-iops",
            "100",
            "--write-bps",
            "0",
        ]);
        assert_eq!(
            err(&["volume", "set-limits", "v1"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn export_commands() {
        let cli = ok(&["export", "add", "v1"]);
        let Command::Export(ExportCmd::Add {
            volume,
            name,
            read_only,
        }) = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!((volume.as_str(), name, read_only), ("v1", None, false));

        let cli = ok(&[
            "export",
            "add",
            "v1",
            "--name",
            "disk0",
            "--read-only",
            "-o",
            "json",
        ]);
        let Command::Export(ExportCmd::Add {
            volume,
            name,
            read_only,
        }) = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(
            (volume.as_str(), name.as_deref(), read_only),
            ("v1", Some("disk0"), true)
        );
        assert_eq!(cli.output, OutputFormat::Json);

        assert!(matches!(
            ok(&["export", "list"]).command,
            Command::Export(ExportCmd::List)
        ));
        let cli = ok(&["export", "remove", "disk0"]);
        let Command::Export(ExportCmd::Remove { name }) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(name, "disk0");

        assert_eq!(
            err(&["export", "add"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&["export", "add", "v1", "--name"]).kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            err(&["export", "remove"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&["export", "list", "x"]).kind(),
            ErrorKind::UnknownArgument
        );
        assert_eq!(
            err(&["export", "frobnicate"]).kind(),
            ErrorKind::InvalidSubcommand
        );
    }

    #[test]
    fn bad_sizes_are_usage_errors() {
        for bad in ["", "-1", "12Q", "lots", "99999999999T", "0.1K"] {
            let e = err(&["volume", "create", "v", "--size", bad]);
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad}");
            assert_eq!(e.exit_code(), 2);
        }
        assert_eq!(
            err(&["volume", "create", "v"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn mirror_start_all_options() {
        let cli = ok(&[
            "mirror",
            "start",
            "src",
            "--target",
            "volume:dst",
            "--job",
            "j1",
            "--mode",
            "write-blocking",
            "--sync",
            "full",
            "--granularity",
            "64K",
            "--buf-size",
            "16M",
            "--speed",
            "100M",
            "--on-source-error",
            "stop",
            "--on-target-error",
            "enospc",
            "--no-auto-finalize",
            "--no-auto-dismiss",
            "--wait",
            "ready",
        ]);
        let Command::Mirror(MirrorCmd::Start(a)) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(a.source, "src");
        assert_eq!(a.target, "volume:dst");
        assert_eq!(a.job.as_deref(), Some("j1"));
        assert_eq!(a.mode, Some(ModeArg::WriteBlocking));
        assert_eq!(a.sync, Some(SyncArg::Full));
        assert_eq!(a.granularity, Some(65536));
        assert_eq!(a.buf_size, Some(16 << 20));
        assert_eq!(a.speed, Some(100 << 20));
        assert_eq!(a.on_source_error, Some(PolicyArg::Stop));
        assert_eq!(a.on_target_error, Some(PolicyArg::Enospc));
        assert!(a.no_auto_finalize && a.no_auto_dismiss);
        assert_eq!(a.wait, Some(WaitArg::Ready));
    }

    #[test]
    fn mirror_start_minimal_and_modes() {
        let cli = ok(&["mirror", "start", "src", "--target", "file:/tmp/t.raw"]);
        let Command::Mirror(MirrorCmd::Start(a)) = cli.command else {
            panic!()
        };
        assert_eq!((a.job, a.mode, a.sync, a.wait), (None, None, None, None));

        for (s, m) in [
            ("background", ModeArg::Background),
            ("write-blocking", ModeArg::WriteBlocking),
            ("write_blocking", ModeArg::WriteBlocking),
            ("auto", ModeArg::Auto),
        ] {
            let cli = ok(&["mirror", "start", "s", "--target", "volume:t", "--mode", s]);
            let Command::Mirror(MirrorCmd::Start(a)) = cli.command else {
                panic!()
            };
            assert_eq!(a.mode, Some(m));
        }
        ok(&[
            "mirror", "start", "s", "--target", "volume:t", "--sync", "none",
        ]);
        ok(&[
            "mirror", "start", "s", "--target", "volume:t", "--wait", "done",
        ]);
        ok(&[
            "mirror", "start", "s", "--target", "volume:t", "--bitmap", "b0",
        ]);
        ok(&[
            "mirror", "start", "s", "--target", "volume:t", "--sync", "bitmap", "--bitmap", "b0",
        ]);
    }

    #[test]
    fn mirror_start_bad_flags() {
        let base = ["mirror", "start", "s", "--target", "volume:t"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            err(&v)
        };
        assert_eq!(with(&["--mode", "sync"]).kind(), ErrorKind::InvalidValue);
        assert_eq!(with(&["--sync", "partial"]).kind(), ErrorKind::InvalidValue);
        assert_eq!(
            with(&["--on-target-error", "panic"]).kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(with(&["--wait", "forever"]).kind(), ErrorKind::InvalidValue);
        assert_eq!(
            with(&["--speed", "fast"]).kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            with(&["--granularity", "-4K"]).kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            with(&["--sync", "bitmap"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(with(&["--bogus"]).kind(), ErrorKind::UnknownArgument);
        assert_eq!(
            err(&["mirror", "start", "s"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn mirror_start_convergence_policy() {
        let cli = ok(&[
            "mirror",
            "start",
            "s",
            "--target",
            "volume:t",
            "--mode",
            "auto",
            "--auto-ready-timeout",
            "90",
            "--auto-diverging-window",
            "0.5",
            "--auto-min-dwell",
            "2.25",
            "--target-latency-limit",
            "40",
            "--target-latency-window",
            "1.5",
            "--guest-throttle",
            "10M",
            "--guest-throttle-below",
            "256M",
            "--copier-share",
            "60",
            "--copier-time-share",
            "30",
        ]);
        let Command::Mirror(MirrorCmd::Start(a)) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(a.copier_share, Some(60));
        assert_eq!(a.copier_time_share, Some(30));
        assert_eq!(a.auto_ready_timeout, Some(90_000));
        assert_eq!(a.auto_diverging_window, Some(500));
        assert_eq!(a.auto_min_dwell, Some(2_250));
        assert_eq!(a.target_latency_limit, Some(40));
        assert_eq!(a.target_latency_window, Some(1_500));
        assert_eq!(a.guest_throttle, Some(10 << 20));
        assert_eq!(a.guest_throttle_below, Some(256 << 20));

        // None of them given: all unset.
        let cli = ok(&["mirror", "start", "s", "--target", "volume:t"]);
        let Command::Mirror(MirrorCmd::Start(a)) = cli.command else {
            panic!()
        };
        assert_eq!(
            (
                a.auto_ready_timeout,
                a.auto_diverging_window,
                a.auto_min_dwell,
                a.target_latency_limit,
                a.target_latency_window,
                a.guest_throttle,
                a.guest_throttle_below,
            ),
            (None, None, None, None, None, None, None)
        );

        // 0 switches the guard and the throttle off explicitly.
        let cli = ok(&[
            "mirror",
            "start",
            "s",
            "--target",
            "volume:t",
            "--target-latency-limit",
            "0",
            "--guest-throttle",
            "0",
        ]);
        let Command::Mirror(MirrorCmd::Start(a)) = cli.command else {
            panic!()
        };
        assert_eq!(
            (a.target_latency_limit, a.guest_throttle),
            (Some(0), Some(0))
        );

        // The policy also counts after a later `job change --mode auto`,
        // so the auto options do not need --mode auto.
        ok(&[
            "mirror",
            "start",
            "s",
            "--target",
            "volume:t",
            "--auto-ready-timeout",
            "30",
        ]);
    }

    #[test]
    fn mirror_start_bad_convergence_values() {
        let base = ["mirror", "start", "s", "--target", "volume:t"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            err(&v)
        };
        for flag in ["--copier-share", "--copier-time-share"] {
            for bad in ["0", "101", "half", "50%", ""] {
                let e = with(&[flag, bad]);
                assert_eq!(e.kind(), ErrorKind::ValueValidation, "{flag} {bad}");
            }
        }
        for flag in [
            "--auto-ready-timeout",
            "--auto-diverging-window",
            "--auto-min-dwell",
        ] {
            // 0 (and what rounds to it) would mean the server's default.
            for bad in [
                "0", "0.0001", "-1", "-0.5", "soon", "", "NaN", "inf", "1e300",
            ] {
                let e = with(&[flag, bad]);
                assert_eq!(e.kind(), ErrorKind::ValueValidation, "{flag} {bad}");
                assert_eq!(e.exit_code(), 2);
            }
        }
        let e = with(&["--auto-ready-timeout", "0"]).to_string();
        assert!(e.contains("leave the option out"), "{e}");
        for bad in ["-1", "1.5", "40ms", "fast", ""] {
            assert_eq!(
                with(&["--target-latency-limit", bad]).kind(),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        let limit = ["--target-latency-limit", "40"];
        for bad in ["0", "-2", "x"] {
            assert_eq!(
                with(&[&limit[..], &["--target-latency-window", bad]].concat()).kind(),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        for bad in ["fast", "-1M", "12Q", "0.1K"] {
            assert_eq!(
                with(&["--guest-throttle", bad]).kind(),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        let throttle = ["--guest-throttle", "10M"];
        for bad in ["0", "-64M", "lots"] {
            assert_eq!(
                with(&[&throttle[..], &["--guest-throttle-below", bad]].concat()).kind(),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        // A window without a limit, a threshold without a rate: nothing to
        // apply them to.
        assert_eq!(
            with(&["--target-latency-window", "2"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            with(&["--guest-throttle-below", "64M"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            with(&["--auto-ready-timeout"]).kind(),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn policy_parsers() {
        assert_eq!(parse_policy_secs("60"), Ok(60_000));
        assert_eq!(parse_policy_secs("0.5"), Ok(500));
        assert_eq!(parse_policy_secs(" 2.5 "), Ok(2_500));
        assert_eq!(parse_policy_secs("0.001"), Ok(1));
        // Rounded to the nearest millisecond.
        assert_eq!(parse_policy_secs("0.0015"), Ok(2));
        assert_eq!(parse_policy_secs("1.0004"), Ok(1_000));
        assert!(parse_policy_secs("0").is_err());
        assert!(parse_policy_secs("0.0004").is_err());
        assert!(parse_policy_secs("1e17").is_err());
        assert_eq!(parse_millis("0"), Ok(0));
        assert_eq!(parse_millis("250"), Ok(250));
        assert!(parse_millis("2.5").is_err());
        assert_eq!(parse_nonzero_size("64M"), Ok(64 << 20));
        assert!(parse_nonzero_size("0").is_err());
        assert!(parse_nonzero_size("-1").is_err());
    }

    #[test]
    fn help_explains_convergence() {
        let help = long_help(&["mirror", "start"]);
        for needle in [
            "--auto-ready-timeout <SECS>",
            "--auto-diverging-window <SECS>",
            "--auto-min-dwell <SECS>",
            "--target-latency-limit <MS>",
            "--target-latency-window <SECS>",
            "--guest-throttle <RATE>",
            "--guest-throttle-below <SIZE>",
            "Convergence",
            "starts in background mode",
            "re-dirtying at least 3/4",
            "under half the copy rate",
            "--copier-share <PERCENT>",
            "Guests first",
            "dwell doubles",
            "Target-latency guard",
            "Guest throttling (off by default)",
            "trade-off",
            "binary suffix",
            "nbd://HOST[:PORT]/EXPORT",
        ] {
            assert!(help.contains(needle), "{needle}: {help}");
        }
        // The short help stays short: flags, targets and sizes only.
        let mut cmd = Cli::command();
        let start = cmd
            .find_subcommand_mut("mirror")
            .and_then(|m| m.find_subcommand_mut("start"))
            .expect("mirror start exists");
        let short = start.render_help().to_string();
        assert!(short.contains("--guest-throttle <RATE>"), "{short}");
        assert!(
            !short.contains("Guest throttling (off by default)"),
            "{short}"
        );
        assert!(short.contains("binary suffix"), "{short}");
    }

    #[test]
    fn job_commands() {
        for verb in ["show", "pause", "resume", "finalize", "dismiss"] {
            ok(&["job", verb, "j1"]);
        }
        ok(&["job", "list"]);
        let cli = ok(&["job", "set-speed", "j1", "10M"]);
        assert!(matches!(
            cli.command,
            Command::Job(JobCmd::SetSpeed {
                rate: 0xA0_0000,
                ..
            })
        ));
        let cli = ok(&["job", "change", "j1", "--mode", "write_blocking"]);
        assert!(matches!(
            cli.command,
            Command::Job(JobCmd::Change {
                mode: ModeArg::WriteBlocking,
                ..
            })
        ));
        assert!(matches!(
            ok(&["job", "complete", "j1", "--wait"]).command,
            Command::Job(JobCmd::Complete { wait: true, .. })
        ));
        assert!(matches!(
            ok(&["job", "cancel", "j1", "--force"]).command,
            Command::Job(JobCmd::Cancel { force: true, .. })
        ));
        assert_eq!(
            err(&["job", "change", "j1"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&["job", "set-speed", "j1", "x"]).kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            err(&["job", "frobnicate", "j1"]).kind(),
            ErrorKind::InvalidSubcommand
        );
    }

    #[test]
    fn job_wait_states_and_timeout() {
        let cli = ok(&[
            "job",
            "wait",
            "j1",
            "--until",
            "ready,concluded",
            "--timeout",
            "2.5",
        ]);
        let Command::Job(JobCmd::Wait { id, until, timeout }) = cli.command else {
            panic!()
        };
        assert_eq!(id, "j1");
        assert_eq!(until, vec![StateArg::Ready, StateArg::Concluded]);
        assert_eq!(timeout, Some(Duration::from_millis(2500)));

        let cli = ok(&["job", "wait", "j1", "--until", "paused", "--until", "null"]);
        let Command::Job(JobCmd::Wait { until, timeout, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(until, vec![StateArg::Paused, StateArg::Null]);
        assert_eq!(timeout, None);

        assert_eq!(
            err(&["job", "wait", "j1", "--until", "bogus"]).kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            err(&["job", "wait", "j1", "--until", "ready,unspecified"]).kind(),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            err(&["job", "wait", "j1"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&["job", "wait", "j1", "--until", "ready", "--timeout", "-1"]).kind(),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn every_state_parses_to_its_lowercase_name() {
        for arg in StateArg::value_variants() {
            let name = arg.to_possible_value().expect("no skipped variants");
            assert_eq!(name.get_name(), job_state_name(JobState::from(*arg)));
        }
        for arg in ModeArg::value_variants() {
            let name = arg.to_possible_value().expect("no skipped variants");
            assert_eq!(name.get_name(), copy_mode_name(CopyMode::from(*arg)));
        }
    }

    #[test]
    fn watch_command() {
        let cli = ok(&["watch"]);
        let Command::Watch(w) = cli.command else {
            panic!()
        };
        assert_eq!((w.id, w.from), (None, 0));
        let cli = ok(&["watch", "j1", "--from", "42", "-o", "json"]);
        let Command::Watch(w) = cli.command else {
            panic!()
        };
        assert_eq!((w.id.as_deref(), w.from), (Some("j1"), 42));
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(
            err(&["watch", "--from", "x"]).kind(),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn data_commands() {
        let cli = ok(&[
            "data",
            "write",
            "v",
            "--offset",
            "4K",
            "--pattern",
            "0xab",
            "--length",
            "1M",
        ]);
        assert!(matches!(
            cli.command,
            Command::Data(DataCmd::Write {
                offset: 4096,
                pattern: Some(0xab),
                length: Some(0x10_0000),
                file: None,
                ..
            })
        ));
        ok(&["data", "write", "v", "--offset", "0", "--file", "/tmp/x"]);
        assert_eq!(
            err(&["data", "write", "v", "--offset", "0"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&["data", "write", "v", "--offset", "0", "--pattern", "1"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err(&[
                "data",
                "write",
                "v",
                "--offset",
                "0",
                "--file",
                "f",
                "--pattern",
                "1",
                "--length",
                "1"
            ])
            .kind(),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            err(&[
                "data",
                "write",
                "v",
                "--offset",
                "0",
                "--pattern",
                "256",
                "--length",
                "1"
            ])
            .kind(),
            ErrorKind::ValueValidation
        );
        let cli = ok(&[
            "data", "read", "v", "--offset", "0", "--length", "512", "--out", "/tmp/o",
        ]);
        assert!(matches!(
            cli.command,
            Command::Data(DataCmd::Read {
                length: 512,
                out: Some(_),
                ..
            })
        ));
        ok(&["data", "read", "v", "--offset", "0", "--length", "512"]);
        ok(&["data", "flush", "v"]);
        ok(&["data", "discard", "v", "--offset", "1M", "--length", "64K"]);
        assert!(matches!(
            ok(&[
                "data",
                "write-zeroes",
                "v",
                "--offset",
                "0",
                "--length",
                "1M",
                "--no-hole"
            ])
            .command,
            Command::Data(DataCmd::WriteZeroes { no_hole: true, .. })
        ));
        assert_eq!(
            err(&["data", "discard", "v", "--offset", "0"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn help_explains_sizes_and_targets() {
        let mut cmd = Cli::command();
        let start = cmd
            .find_subcommand_mut("mirror")
            .and_then(|m| m.find_subcommand_mut("start"))
            .expect("mirror start exists");
        let help = start.render_long_help().to_string();
        assert!(help.contains("nbd://HOST[:PORT]/EXPORT"), "{help}");
        assert!(help.contains("nbd+unix:///EXPORT?socket=PATH"), "{help}");
        assert!(help.contains("binary suffix"), "{help}");
        assert_eq!(err(&["--help"]).kind(), ErrorKind::DisplayHelp);
    }

    /// The long help of `mirrorctl ARGS...` (a subcommand path).
    fn long_help(path: &[&str]) -> String {
        let mut cmd = Cli::command();
        let mut sub = &mut cmd;
        for name in path {
            sub = sub
                .find_subcommand_mut(name)
                .unwrap_or_else(|| panic!("no subcommand {name}"));
        }
        sub.render_long_help().to_string()
    }

    #[test]
    fn help_explains_nbd_uris_and_exports() {
        let attach = long_help(&["volume", "attach"]);
        assert!(attach.contains("nbd://HOST[:PORT]/EXPORT"), "{attach}");
        assert!(
            attach.contains("nbd+unix:///EXPORT?socket=PATH"),
            "{attach}"
        );
        assert!(!attach.contains("not supported"), "{attach}");
        for path in [
            &["export"][..],
            &["export", "add"][..],
            &["export", "list"][..],
        ] {
            let help = long_help(path);
            assert!(
                help.contains("nbd+unix:///EXPORT?socket=STATE_DIR/nbd.sock"),
                "{path:?}: {help}"
            );
            assert!(help.contains("--nbd-listen"), "{path:?}: {help}");
        }
    }

    #[test]
    fn byte_and_seconds_parsers() {
        assert_eq!(parse_byte("0"), Ok(0));
        assert_eq!(parse_byte("255"), Ok(255));
        assert_eq!(parse_byte("0xAb"), Ok(0xab));
        assert!(parse_byte("256").is_err());
        assert!(parse_byte("-1").is_err());
        assert!(parse_byte("0x").is_err());
        assert_eq!(parse_secs("0"), Ok(Duration::ZERO));
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_secs("inf").is_err());
        assert!(parse_secs("NaN").is_err());
        assert!(parse_secs("soon").is_err());
    }
}
