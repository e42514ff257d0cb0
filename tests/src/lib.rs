//! Test harness: starts the real `blockmirrord` binary on a private state
//! directory and unix socket, and gives typed gRPC clients to it.
//!
//! The binaries are found next to the test executable (`target/debug/`);
//! `cargo test --workspace` builds them before running tests.
//!
//! # Layout
//!
//! - [`TestServer`]: one `blockmirrord` process, killed on drop.
//! - [`Guest`]: a guest writer that keeps a model of what the disk must
//!   hold, so a test can check every acknowledged write afterwards.
//! - helpers to wait for jobs and events.
//! - [`otlp`]: an in-process OTLP/gRPC receiver (traces and metrics), also
//!   behind the `otlp-sink` binary the telemetry benchmark uses.

pub mod otlp;

use blockmirror_proto::v1::{
    self, data_service_client::DataServiceClient, job_service_client::JobServiceClient,
    volume_service_client::VolumeServiceClient,
};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Path of a workspace binary (`blockmirrord`, `mirrorctl`) built next to
/// this test executable. `cargo test` builds only test harnesses of other
/// packages, not their binaries, so the first call builds them (a no-op when
/// they are fresh) with the same cargo and profile.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "blockmirror-server",
            "-p",
            "blockmirror-client",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(
            status.success(),
            "building blockmirrord and mirrorctl failed"
        );
    });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing after building it",
        path.display()
    );
    path
}

/// A running `blockmirrord`.
#[derive(Debug)]
pub struct TestServer {
    /// The state directory (and scratch space for images).
    pub dir: tempfile::TempDir,
    /// The gRPC unix socket.
    pub socket: PathBuf,
    /// The NBD unix socket.
    pub nbd_socket: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl TestServer {
    /// Starts a server on a new state directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra flags.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bm-test")
            .tempdir()
            .expect("tempdir");
        Self::start_in(dir, extra)
    }

    /// Starts a server with extra flags and environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bm-test")
            .tempdir()
            .expect("tempdir");
        Self::spawn(dir, extra, env)
    }

    /// Starts a server on an existing state directory (restart tests).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::spawn(dir, extra, &[])
    }

    fn spawn(dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let socket = dir.path().join("state").join("blockmirror.sock");
        let nbd_socket = dir.path().join("state").join("nbd.sock");
        let log = dir.path().join("blockmirrord.log");
        let mut child = Command::new(binary("blockmirrord"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(extra)
            .envs(env.iter().copied())
            .env("BLOCKMIRROR_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn blockmirrord");
        // Readiness: the server logs one line per bound listener. Read its
        // log until that line (no sleeping, no polling), then keep copying
        // the log to a file for failure analysis.
        let stderr = child.stderr.take().expect("piped stderr");
        let mut reader = BufReader::new(stderr);
        let mut file = std::fs::File::create(&log).expect("log file");
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read server log");
            use std::io::Write;
            let _ = file.write_all(line.as_bytes());
            assert!(
                n > 0,
                "blockmirrord exited before listening; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            if line.contains("gRPC listening") {
                break;
            }
        }
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut file);
        });
        Self {
            dir,
            socket,
            nbd_socket,
            child: Some(child),
            log,
        }
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The NBD URI of `export` on this server's unix socket.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_socket.display())
    }

    /// The server's resident memory now, in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("server running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS in /proc/PID/status")
            * 1024
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        child.wait().expect("wait for blockmirrord")
    }

    /// Kills the server with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let _ = child.kill();
        child.wait().expect("wait for blockmirrord")
    }

    /// Stops the server and returns its state directory for a restart.
    pub fn stop(mut self) -> tempfile::TempDir {
        let status = self.terminate();
        assert!(
            status.success(),
            "blockmirrord exited with {status}; log:\n{}",
            self.log()
        );
        let dir = tempfile::Builder::new()
            .prefix("bm-dummy")
            .tempdir()
            .expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }

    /// A gRPC channel over the unix socket.
    pub async fn channel(&self) -> Channel {
        let path = self.socket.clone();
        Endpoint::try_from("http://[::]:50051")
            .expect("static URI")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await
            .expect("connect to blockmirrord")
    }

    /// Typed clients.
    pub async fn clients(&self) -> Clients {
        let ch = self.channel().await;
        Clients {
            volumes: VolumeServiceClient::new(ch.clone()),
            data: DataServiceClient::new(ch.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            jobs: JobServiceClient::new(ch),
        }
    }

    /// Runs `mirrorctl` against this server.
    pub fn mirrorctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("mirrorctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run mirrorctl")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The three service clients.
#[derive(Debug, Clone)]
pub struct Clients {
    /// VolumeService.
    pub volumes: VolumeServiceClient<Channel>,
    /// DataService.
    pub data: DataServiceClient<Channel>,
    /// JobService.
    pub jobs: JobServiceClient<Channel>,
}

impl Clients {
    /// Creates a volume of `size` bytes.
    pub async fn create_volume(&mut self, name: &str, size: u64) -> v1::Volume {
        self.volumes
            .create_volume(v1::CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                path: String::new(),
            })
            .await
            .expect("create volume")
            .into_inner()
    }

    /// Exports a volume over NBD under its own name.
    pub async fn export(&mut self, volume: &str, read_only: bool) {
        self.volumes
            .add_export(v1::AddExportRequest {
                volume: volume.into(),
                name: String::new(),
                read_only,
            })
            .await
            .expect("add export");
    }

    /// Sets a write limit on a volume (bytes/s).
    pub async fn limit(&mut self, name: &str, bps: u64) {
        self.volumes
            .set_volume_limits(v1::SetVolumeLimitsRequest {
                name: name.into(),
                limits: Some(v1::IoLimits {
                    write_bytes_per_sec: bps,
                    write_iops: 0,
                }),
            })
            .await
            .expect("set limits");
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, volume: &str, offset: u64, data: Vec<u8>) {
        self.data
            .write(v1::WriteRequest {
                volume: volume.into(),
                offset_bytes: offset,
                data: Bytes::from(data),
                fua: false,
            })
            .await
            .expect("write");
    }

    /// Reads `len` bytes at `offset` (in requests of at most 16 MiB).
    pub async fn read(&mut self, volume: &str, offset: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(len).expect("test sizes fit usize"));
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(16 << 20);
            let part = self
                .data
                .read(v1::ReadRequest {
                    volume: volume.into(),
                    offset_bytes: at,
                    length_bytes: n,
                })
                .await
                .expect("read")
                .into_inner()
                .data;
            out.extend_from_slice(&part);
            at += n;
        }
        out
    }

    /// Fills a volume with seeded random bytes through the data path.
    pub async fn fill_random(&mut self, volume: &str, size: u64, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut all = vec![0u8; usize::try_from(size).expect("test sizes fit usize")];
        rng.fill(&mut all[..]);
        for (i, chunk) in all.chunks(4 << 20).enumerate() {
            self.write(volume, i as u64 * (4 << 20), chunk.to_vec())
                .await;
        }
        all
    }

    /// Starts a mirror.
    pub async fn start_mirror(&mut self, id: &str, spec: v1::MirrorSpec) -> v1::Job {
        self.jobs
            .start_mirror(v1::StartMirrorRequest {
                job_id: id.into(),
                spec: Some(spec),
            })
            .await
            .expect("start mirror")
            .into_inner()
    }

    /// The job now.
    pub async fn job(&mut self, id: &str) -> v1::Job {
        self.jobs
            .get_job(v1::GetJobRequest { job_id: id.into() })
            .await
            .expect("get job")
            .into_inner()
    }

    /// Asks a READY job to complete and waits until it has concluded;
    /// returns the concluded job.
    pub async fn complete_and_wait(&mut self, id: &str, timeout: Duration) -> v1::Job {
        self.jobs
            .complete_job(v1::JobRequest { job_id: id.into() })
            .await
            .expect("complete");
        self.wait_for(id, &[v1::JobState::Concluded], timeout).await
    }

    /// Waits (long poll) until the job is in one of `states`; panics after `timeout`.
    pub async fn wait_for(
        &mut self,
        id: &str,
        states: &[v1::JobState],
        timeout: Duration,
    ) -> v1::Job {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let job = self
                .jobs
                .wait_job(v1::WaitJobRequest {
                    job_id: id.into(),
                    until: states.iter().map(|s| *s as i32).collect(),
                    timeout_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1),
                })
                .await
                .expect("wait job")
                .into_inner();
            if states.iter().any(|s| *s as i32 == job.state) {
                return job;
            }
            assert!(
                !left.is_zero(),
                "job {id} did not reach {states:?} within {timeout:?}: {job:?}"
            );
        }
    }

    /// Events of `job` after sequence `after`, up to and including the
    /// first of type `until`; panics if none comes within 60 s.
    pub async fn events_until(
        &mut self,
        job: &str,
        after: u64,
        until: v1::EventType,
    ) -> Vec<v1::Event> {
        use tokio_stream::StreamExt;
        let mut w = self
            .jobs
            .watch_events(v1::WatchEventsRequest {
                job_id: job.into(),
                after_sequence: after,
            })
            .await
            .expect("watch")
            .into_inner();
        let mut out = Vec::new();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), w.next())
                .await
                .unwrap_or_else(|_| panic!("no {until:?} for {job}; got {out:?}"))
                .expect("stream open")
                .expect("event");
            if let Some(v1::watch_events_response::Kind::Event(e)) = msg.kind {
                let done = e.r#type == until as i32;
                out.push(e);
                if done {
                    return out;
                }
            }
        }
    }

    /// After a pivot: `volume` reads as `model`, and so does the file that
    /// now backs it; returns the volume.
    pub async fn assert_volume_holds(&mut self, volume: &str, model: &[u8]) -> v1::Volume {
        let len = model.len() as u64;
        assert_same(
            "read through the volume",
            &self.read(volume, 0, len).await,
            model,
        );
        let vol = self
            .volumes
            .get_volume(v1::GetVolumeRequest {
                name: volume.into(),
            })
            .await
            .expect("get volume")
            .into_inner();
        let file = std::fs::read(&vol.path).expect("read the volume's file");
        assert_same("the volume's file", &file, model);
        vol
    }
}

/// A mirror spec with defaults for everything but source, target and mode.
pub fn spec(source: &str, target: &str, mode: v1::CopyMode) -> v1::MirrorSpec {
    v1::MirrorSpec {
        source_volume: source.into(),
        target: target.into(),
        copy_mode: mode as i32,
        ..Default::default()
    }
}

/// One guest operation.
#[derive(Debug, Clone)]
pub enum GuestOp {
    /// Write bytes.
    Write(u64, Vec<u8>),
    /// Discard (reads as zeroes afterwards in blockmirror).
    Discard(u64, u64),
    /// Write zeroes.
    Zeroes(u64, u64),
}

/// A guest that writes a region of a volume sequentially (one request at a
/// time) and keeps the bytes the region must hold. Several guests on
/// disjoint regions make a concurrent workload with an exact oracle.
#[derive(Debug)]
pub struct Guest {
    /// Volume written.
    pub volume: String,
    /// Region start.
    pub base: u64,
    /// What the region must hold after every acknowledged write.
    pub model: Vec<u8>,
    rng: rand::rngs::StdRng,
    /// Operations acknowledged.
    pub ops: u64,
}

impl Guest {
    /// A guest over `[base, base + initial.len())` whose current content is `initial`.
    pub fn new(volume: &str, base: u64, initial: Vec<u8>, seed: u64) -> Self {
        Self {
            volume: volume.into(),
            base,
            model: initial,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            ops: 0,
        }
    }

    /// A random operation: sizes 512 B to 256 KiB, 1 KiB writes at odd
    /// offsets, discards and write-zeroes.
    pub fn next_op(&mut self) -> GuestOp {
        let len_region = self.model.len() as u64;
        let kind = self.rng.random_range(0..10);
        let len: u64 = match kind {
            0..=2 => 1024,
            3..=6 => 512 * self.rng.random_range(1..=512u64),
            _ => 4096 * self.rng.random_range(1..=16u64),
        };
        let len = len.min(len_region);
        let mut off = self.rng.random_range(0..=len_region - len);
        if kind <= 2 {
            // Unaligned: an odd byte offset.
            off |= 1;
            off = off.min(len_region - len);
        }
        match kind {
            7 => GuestOp::Discard(off, len),
            8 => GuestOp::Zeroes(off, len),
            _ => {
                let mut data = vec![0u8; usize::try_from(len).expect("small")];
                self.rng.fill(&mut data[..]);
                GuestOp::Write(off, data)
            }
        }
    }

    /// Issues one operation and records it in the model once acknowledged.
    pub async fn step(&mut self, c: &mut Clients) {
        let op = self.next_op();
        let vol = self.volume.clone();
        let (off, len, data) = match op {
            GuestOp::Write(off, data) => {
                c.data
                    .write(v1::WriteRequest {
                        volume: vol,
                        offset_bytes: self.base + off,
                        data: Bytes::from(data.clone()),
                        fua: false,
                    })
                    .await
                    .expect("guest write");
                (off, data.len(), Some(data))
            }
            GuestOp::Discard(off, len) => {
                c.data
                    .discard(v1::DiscardRequest {
                        volume: vol,
                        offset_bytes: self.base + off,
                        length_bytes: len,
                    })
                    .await
                    .expect("guest discard");
                (off, usize::try_from(len).expect("small"), None)
            }
            GuestOp::Zeroes(off, len) => {
                c.data
                    .write_zeroes(v1::WriteZeroesRequest {
                        volume: vol,
                        offset_bytes: self.base + off,
                        length_bytes: len,
                        no_hole: false,
                    })
                    .await
                    .expect("guest write-zeroes");
                (off, usize::try_from(len).expect("small"), None)
            }
        };
        let start = usize::try_from(off).expect("small");
        let dst = &mut self.model[start..start + len];
        match data {
            Some(d) => dst.copy_from_slice(&d),
            None => dst.fill(0),
        }
        self.ops += 1;
    }
}

impl Guest {
    /// Runs this guest on its own task until `stop` is set; the task
    /// returns the guest with its model of the region.
    pub fn spawn(
        self,
        c: &Clients,
        stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<Guest> {
        self.spawn_paced(c, stop, std::time::Duration::ZERO)
    }

    /// [`Self::spawn`], resting `pause` after every operation (a light
    /// load).
    pub fn spawn_paced(
        mut self,
        c: &Clients,
        stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
        pause: std::time::Duration,
    ) -> tokio::task::JoinHandle<Guest> {
        let mut c = c.clone();
        let stop = std::sync::Arc::clone(stop);
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                self.step(&mut c).await;
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            self
        })
    }
}

/// Guests on their own tasks (see [`Guest::spawn_paced`]) until stopped.
#[derive(Debug)]
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    guests: Vec<tokio::task::JoinHandle<Guest>>,
}

impl Load {
    /// Runs `guests`, each resting `pause` after every operation (zero: as
    /// fast as it can).
    pub fn start(c: &Clients, guests: Vec<Guest>, pause: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guests = guests
            .into_iter()
            .map(|g| g.spawn_paced(c, &stop, pause))
            .collect();
        Self { stop, guests }
    }

    /// `n` guests on equal, disjoint regions of `volume`, whose content
    /// now is `content` (the whole volume); seeds `seed`, `seed + 1`, ...
    pub fn guests(volume: &str, content: &[u8], n: u64, seed: u64) -> Vec<Guest> {
        let region = content.len() / usize::try_from(n).expect("small");
        content
            .chunks_exact(region)
            .zip(0..n)
            .map(|(initial, i)| Guest::new(volume, i * region as u64, initial.to_vec(), seed + i))
            .collect()
    }

    /// Stops the guests, each after its current operation, and returns
    /// them in the order they were started.
    pub async fn stop(self) -> Vec<Guest> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::with_capacity(self.guests.len());
        for g in self.guests {
            out.push(g.await.expect("guest task"));
        }
        out
    }
}

/// Index of the first differing byte, if any (to keep failure output short).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Asserts two byte slices are equal, reporting the first difference.
#[track_caller]
pub fn assert_same(what: &str, a: &[u8], b: &[u8]) {
    if let Some(i) = first_difference(a, b) {
        panic!(
            "{what}: differ at byte {i} (chunk {} at 64 KiB) of {} / {}",
            i / 65536,
            a.len(),
            b.len()
        );
    }
}

/// Runs an external tool and returns (success, stdout + stderr).
pub fn tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} could not be started ({e}); .ci/run installs it"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs an external tool and panics with its output unless it succeeds.
#[track_caller]
pub fn tool_ok(program: &str, args: &[&str]) -> String {
    let (ok, text) = tool(program, args);
    assert!(ok, "{program} {args:?} failed:\n{text}");
    text
}

/// An `nbdkit` memory disk on a unix socket whose every write the delay
/// filter holds for `wdelay`: a slow NBD device for tests. Killed on drop.
#[derive(Debug)]
pub struct Nbdkit {
    child: Child,
    socket: PathBuf,
}

impl Nbdkit {
    /// Starts `nbdkit --filter=delay memory SIZE wdelay=WDELAY` on `socket`
    /// (e.g. size "64M", wdelay "20ms") and waits until it listens.
    pub async fn start_delayed(socket: PathBuf, size: &str, wdelay: &str) -> Self {
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args([
                "--filter=delay",
                "memory",
                size,
                &format!("wdelay={wdelay}"),
            ])
            .spawn()
            .expect("nbdkit (apt-get install nbdkit)");
        let nbdkit = Self { child, socket };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !nbdkit.socket.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nbdkit did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nbdkit
    }

    /// Its NBD URI.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
