//! End to end over NBD: a volume exported by blockmirrord is written by fio
//! (random 4 KiB and 64 KiB blocks) while it is mirrored, in each copy mode,
//! to a remote NBD target — served by qemu-nbd (QEMU's own server) or by a
//! second blockmirrord. After completion, `qemu-img compare` must find the
//! old source and the target identical.

use blockmirror_proto::v1::{self, CopyMode, JobState};
use blockmirror_tests::{TestServer, tool, tool_ok};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SIZE: u64 = 32 << 20;

/// qemu-nbd serving a fresh raw file on a unix socket; killed on drop.
struct QemuNbd {
    pid_file: std::path::PathBuf,
    file: std::path::PathBuf,
    socket: std::path::PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path) -> Self {
        let file = dir.join("qemu-target.raw");
        tool_ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "raw",
                file.to_str().unwrap(),
                &SIZE.to_string(),
            ],
        );
        let q = Self {
            pid_file: dir.join("qemu-nbd.pid"),
            file,
            socket: dir.join("qemu-nbd.sock"),
        };
        q.serve();
        q
    }

    /// Stops serving (as a crash would) and waits until the socket is gone.
    fn kill(&self) {
        let pid = std::fs::read_to_string(&self.pid_file).unwrap();
        tool_ok("kill", &["-9", pid.trim()]);
        let _ = std::fs::remove_file(&self.pid_file);
        let _ = std::fs::remove_file(&self.socket);
    }

    fn serve(&self) {
        let (file, socket, pid_file) = (&self.file, &self.socket, &self.pid_file);
        tool_ok(
            "qemu-nbd",
            &[
                "--fork",
                "--persistent",
                "--shared=8",
                "-f",
                "raw",
                "-x",
                "tgt",
                "--discard=unmap",
                &format!("--socket={}", socket.display()),
                &format!("--pid-file={}", pid_file.display()),
                file.to_str().unwrap(),
            ],
        );
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///tgt?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// fio writing random 4 KiB and 64 KiB blocks to `uri`, rate-limited so a
/// background mirror can also converge.
fn start_fio(uri: &str) -> Child {
    Command::new("fio")
        .args([
            "--name=guest",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bssplit=4k/50:64k/50",
            "--iodepth=8",
            &format!("--size={SIZE}"),
            "--time_based",
            "--runtime=4",
            "--rate=16m",
            "--verify_state_save=0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio (installed by .ci/run)")
}

async fn mirror_over_nbd(mode: CopyMode, target_uri: &str, target_for_compare: &str) {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.fill_random("src", SIZE, 21).await;
    c.export("src", false).await;
    let mut fio = start_fio(&server.nbd_uri("src"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut s = blockmirror_tests::spec("src", target_uri, mode);
    s.auto_dismiss = Some(false);
    c.start_mirror("m", s).await;
    let ready = c
        .wait_for("m", &[JobState::Ready], Duration::from_secs(120))
        .await;
    assert!(ready.error.is_empty(), "{ready:?}");
    // fio writes for 4 s from before the mirror starts: through the copy
    // and (usually) into READY. Then the guest goes quiet.
    let status = tokio::task::spawn_blocking(move || {
        let s = fio.wait().unwrap();
        (s, fio)
    })
    .await
    .unwrap();
    let (status, mut fio) = status;
    let mut err = String::new();
    use std::io::Read;
    fio.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        status.success() && !err.contains("io_u error"),
        "fio: {status} {err}"
    );
    let done = c.complete_and_wait("m", Duration::from_secs(60)).await;
    assert!(done.pivoted && done.error.is_empty(), "{done:?}");
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "src".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.path, target_uri, "the volume now lives on the NBD target");
    let old = server.dir.path().join("state/volumes/src.raw");
    let out = tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            old.to_str().unwrap(),
            target_for_compare,
        ],
    );
    assert!(out.contains("identical"), "{out}");
    // The pivoted volume serves reads from the target, through our own export.
    let out = tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            old.to_str().unwrap(),
            &server.nbd_uri("src"),
        ],
    );
    assert!(out.contains("identical"), "{out}");
}

async fn to_qemu_nbd(mode: CopyMode) {
    let dir = tempfile::tempdir().unwrap();
    let q = QemuNbd::start(dir.path());
    mirror_over_nbd(mode, &q.uri(), q.file.to_str().unwrap()).await;
}

async fn to_second_blockmirrord(mode: CopyMode) {
    let remote = TestServer::start();
    let mut rc = remote.clients().await;
    rc.create_volume("tgt", SIZE).await;
    rc.export("tgt", false).await;
    let uri = remote.nbd_uri("tgt");
    mirror_over_nbd(mode, &uri, &uri).await;
    // What the remote holds in its file is what its export served.
    let file = remote.dir.path().join("state/volumes/tgt.raw");
    let (same, out) = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            file.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(same, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_mirror_to_qemu_nbd() {
    to_qemu_nbd(CopyMode::Background).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_blocking_mirror_to_qemu_nbd() {
    to_qemu_nbd(CopyMode::WriteBlocking).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_mirror_to_second_blockmirrord() {
    to_second_blockmirrord(CopyMode::Background).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_blocking_mirror_to_second_blockmirrord() {
    to_second_blockmirrord(CopyMode::WriteBlocking).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_outage_is_reported_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let q = QemuNbd::start(dir.path());
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    let content = c.fill_random("src", SIZE, 5).await;
    let mut s = blockmirror_tests::spec("src", &q.uri(), CopyMode::WriteBlocking);
    s.on_target_error = v1::ErrorPolicy::Ignore as i32;
    s.speed_bytes_per_sec = 8 << 20;
    s.auto_dismiss = Some(false);
    c.start_mirror("m", s).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    q.kill();
    // Guest writes during the outage are acknowledged (the source has them).
    for i in 0..16u64 {
        c.write("src", i * 300_001 % (SIZE - 4096), vec![0xee; 4096])
            .await;
    }
    let job = c.job("m").await;
    assert_ne!(
        job.state,
        JobState::Concluded as i32,
        "ignore policy keeps the job alive: {job:?}"
    );
    q.serve();
    let ready = c
        .wait_for("m", &[JobState::Ready], Duration::from_secs(120))
        .await;
    assert!(ready.error.is_empty(), "{ready:?}");
    // The outage was reported as errors with the policy's action.
    let mut w = c
        .jobs
        .watch_events(v1::WatchEventsRequest {
            job_id: "m".into(),
            after_sequence: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut errors = 0;
    use tokio_stream::StreamExt;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(500), w.next()).await {
        if let Some(v1::watch_events_response::Kind::Event(e)) = msg.kind
            && e.r#type == v1::EventType::BlockJobError as i32
        {
            assert_eq!(e.side, "target");
            assert_eq!(e.action, "ignore");
            errors += 1;
        }
    }
    assert!(errors > 0, "the outage was not reported");
    let done = c.complete_and_wait("m", Duration::from_secs(60)).await;
    assert!(done.pivoted, "{done:?}");
    let old = server.dir.path().join("state/volumes/src.raw");
    let out = tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            old.to_str().unwrap(),
            q.file.to_str().unwrap(),
        ],
    );
    assert!(out.contains("identical"), "{out}");
    let _ = content;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mirror_to_qemu_nbd() {
    to_qemu_nbd(CopyMode::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mirror_to_second_blockmirrord() {
    to_second_blockmirrord(CopyMode::Auto).await;
}
