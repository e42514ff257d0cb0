//! The core check: mirror under concurrent guest writes (unaligned 1 KiB
//! writes, discards, write-zeroes, sizes from 512 B to 256 KiB), pause,
//! resume and speed changes mid-job, then complete (or cancel in READY) and
//! compare byte for byte — against the source file and against a model of
//! every acknowledged write.

use blockmirror_proto::v1::{self, CopyMode, JobState};
use blockmirror_tests::{Clients, Load, TestServer, assert_same, spec};
use std::time::Duration;

const SIZE: u64 = 32 << 20;
const GUESTS: u64 = 4;

/// Starts `GUESTS` paced guests on disjoint regions of `volume`.
fn start_load(c: &Clients, volume: &str, content: &[u8]) -> Load {
    Load::start(
        c,
        Load::guests(volume, content, GUESTS, 1000),
        Duration::from_millis(2),
    )
}

/// Stops the guests: the expected content of the volume, and how many
/// operations they made.
async fn finish(load: Load) -> (Vec<u8>, u64) {
    let guests = load.stop().await;
    let ops = guests.iter().map(|g| g.ops).sum();
    (guests.into_iter().flat_map(|g| g.model).collect(), ops)
}

async fn setup(mode: CopyMode) -> (TestServer, Clients, Vec<u8>, v1::MirrorSpec) {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    let content = c.fill_random("src", SIZE, 7).await;
    let mut s = spec("src", "volume:dst", mode);
    s.buf_size_bytes = 4 << 20;
    s.speed_bytes_per_sec = 8 << 20;
    s.auto_dismiss = Some(false);
    (server, c, content, s)
}

/// Pause, resume and speed changes while the first pass runs.
async fn exercise_controls(c: &mut Clients, id: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = c
        .jobs
        .pause_job(v1::JobRequest { job_id: id.into() })
        .await
        .expect("pause")
        .into_inner();
    assert!(
        paused.state == JobState::Paused as i32 || paused.state == JobState::Standby as i32,
        "pause gave {paused:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.jobs
        .resume_job(v1::JobRequest { job_id: id.into() })
        .await
        .expect("resume");
    c.jobs
        .set_job_speed(v1::SetJobSpeedRequest {
            job_id: id.into(),
            speed_bytes_per_sec: 0,
        })
        .await
        .expect("set speed");
    assert_eq!(c.job(id).await.speed_bytes_per_sec, 0);
}

async fn complete_under_load(mode: CopyMode) {
    let (server, mut c, content, s) = setup(mode).await;
    let load = start_load(&c, "src", &content);
    c.start_mirror("m", s).await;
    exercise_controls(&mut c, "m").await;
    let ready = c
        .wait_for("m", &[JobState::Ready], Duration::from_secs(90))
        .await;
    if mode != CopyMode::Auto {
        assert_eq!(ready.copy_mode, mode as i32);
    } else {
        assert_ne!(
            ready.copy_mode,
            CopyMode::Auto as i32,
            "the effective mode is never auto"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = c.complete_and_wait("m", Duration::from_secs(60)).await;
    assert!(done.pivoted, "{done:?}");
    assert!(done.error.is_empty(), "{done:?}");
    // Guests keep writing after the pivot: now to the target.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (model, ops) = finish(load).await;
    assert!(ops > 100, "the guests made only {ops} writes");

    let vol = c.assert_volume_holds("src", &model).await;
    // The target volume was absorbed: its file now backs "src".
    let gone = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "dst".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(
        vol.path.ends_with("dst.raw"),
        "the source volume must now use the target's file: {vol:?}"
    );
    c.jobs
        .dismiss_job(v1::JobRequest { job_id: "m".into() })
        .await
        .expect("dismiss");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_blocking_complete_under_concurrent_writes() {
    complete_under_load(CopyMode::WriteBlocking).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_complete_under_concurrent_writes() {
    complete_under_load(CopyMode::Background).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_complete_under_concurrent_writes() {
    complete_under_load(CopyMode::Auto).await;
}

/// Cancel in READY keeps the target as a point-in-time copy, with no pivot.
async fn cancel_in_ready(mode: CopyMode) {
    let (server, mut c, content, s) = setup(mode).await;
    let load = start_load(&c, "src", &content);
    c.start_mirror("m", s).await;
    exercise_controls(&mut c, "m").await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(90))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (model, _) = finish(load).await;
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "m".into(),
            force: false,
        })
        .await
        .expect("cancel");
    let done = c
        .wait_for("m", &[JobState::Concluded], Duration::from_secs(60))
        .await;
    assert!(!done.pivoted);
    let src = std::fs::read(server.dir.path().join("state/volumes/src.raw")).unwrap();
    let dst = std::fs::read(server.dir.path().join("state/volumes/dst.raw")).unwrap();
    assert_same("source file vs model", &src, &model);
    assert_same("target file vs source file", &dst, &src);
    // No pivot: the volume still uses its own file.
    let vol = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "src".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(vol.path.ends_with("src.raw"), "{vol:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_blocking_cancel_in_ready_keeps_consistent_copy() {
    cancel_in_ready(CopyMode::WriteBlocking).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_cancel_in_ready_keeps_consistent_copy() {
    cancel_in_ready(CopyMode::Background).await;
}

/// Every sequence of mode switches — by hand, in both directions, many
/// times, in the first pass and in READY — under concurrent guests ends with
/// the target equal to every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mode_switches_under_load_keep_the_target_exact() {
    let (server, mut c, content, mut s) = setup(CopyMode::Background).await;
    s.speed_bytes_per_sec = 16 << 20;
    let load = start_load(&c, "src", &content);
    c.start_mirror("m", s).await;
    c.wait_for("m", &[JobState::Running], Duration::from_secs(10))
        .await;
    let modes = [
        CopyMode::WriteBlocking,
        CopyMode::Background,
        CopyMode::Auto,
    ];
    let mut seen_ready = false;
    for i in 0..30 {
        let mode = modes[i % modes.len()];
        let j = c
            .jobs
            .change_job(v1::ChangeJobRequest {
                job_id: "m".into(),
                copy_mode: mode as i32,
            })
            .await
            .expect("change mode")
            .into_inner();
        seen_ready |= j.state == JobState::Ready as i32;
        if i == 10 {
            // Let the first pass finish somewhere in the middle of the switching.
            c.jobs
                .set_job_speed(v1::SetJobSpeedRequest {
                    job_id: "m".into(),
                    speed_bytes_per_sec: 0,
                })
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(80 + (i as u64 * 37) % 120)).await;
    }
    let ready = c
        .wait_for("m", &[JobState::Ready], Duration::from_secs(90))
        .await;
    seen_ready |= ready.state == JobState::Ready as i32;
    assert!(seen_ready);
    let done = c.complete_and_wait("m", Duration::from_secs(60)).await;
    assert!(done.pivoted, "{done:?}");
    let (model, ops) = finish(load).await;
    assert!(ops > 100, "only {ops} guest writes");
    let vol = c.assert_volume_holds("src", &model).await;
    assert!(vol.path.ends_with("dst.raw"), "{vol:?}");
    drop(server);
}

/// Bytes of `path` in the page cache, by util-linux's `fincore`.
fn resident_bytes(path: &std::path::Path) -> u64 {
    let out = blockmirror_tests::tool_ok(
        "fincore",
        &[
            "--raw",
            "--noheadings",
            "--bytes",
            "--output",
            "RES",
            path.to_str().unwrap(),
        ],
    );
    out.trim().parse().expect("fincore prints a byte count")
}

async fn volume(c: &mut Clients, name: &str) -> v1::Volume {
    c.volumes
        .get_volume(v1::GetVolumeRequest { name: name.into() })
        .await
        .expect("get volume")
        .into_inner()
}

/// A volume attached with `O_DIRECT`, mirrored under the same guests to a
/// new target file (opened direct too, as it becomes the volume's backend):
/// after the pivot and a restart the volume is still direct and holds every
/// acknowledged write, and no byte of either file went through the page
/// cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_io_volume_mirrors_exactly_and_stays_direct() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    let source = server.path("src-direct.raw");
    std::fs::File::create(&source)
        .and_then(|f| f.set_len(SIZE))
        .unwrap();
    let attached = c
        .volumes
        .attach_volume(v1::AttachVolumeRequest {
            name: "src".into(),
            path: source.to_str().unwrap().into(),
            direct_io: true,
            ..Default::default()
        })
        .await
        .expect("attach with direct I/O")
        .into_inner();
    assert!(attached.direct_io, "{attached:?}");
    let content = c.fill_random("src", SIZE, 9).await;

    let target = server.path("dst-direct.raw");
    let mut s = spec(
        "src",
        &format!("file:{}", target.display()),
        CopyMode::WriteBlocking,
    );
    s.buf_size_bytes = 4 << 20;
    s.speed_bytes_per_sec = 8 << 20;
    s.auto_dismiss = Some(false);
    let load = start_load(&c, "src", &content);
    c.start_mirror("m", s).await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(90))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = c.complete_and_wait("m", Duration::from_secs(60)).await;
    assert!(done.pivoted && done.error.is_empty(), "{done:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (model, ops) = finish(load).await;
    assert!(ops > 100, "the guests made only {ops} writes");

    let vol = volume(&mut c, "src").await;
    assert!(vol.direct_io, "the pivot keeps direct I/O: {vol:?}");
    assert_eq!(vol.path, target.to_str().unwrap());
    assert!(vol.block_size_bytes >= 512, "{vol:?}");
    assert_eq!(resident_bytes(&source), 0, "source file in the page cache");
    assert_eq!(resident_bytes(&target), 0, "target file in the page cache");

    let dir = server.stop();
    let server = TestServer::start_in(dir, &[]);
    let mut c = server.clients().await;
    let vol = volume(&mut c, "src").await;
    assert!(vol.direct_io, "a restart keeps direct I/O: {vol:?}");
    c.assert_volume_holds("src", &model).await;
}

/// A buffered volume that is not in the page cache is mirrored: the copy
/// reads it without leaving it cached (a read through the cache would
/// leave the whole source there, as large folios that make every later
/// small guest write dearer, see `BlockBackend::read_uncached`), and the
/// target is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_copy_leaves_the_source_out_of_the_page_cache() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    let source = server.path("src-cold.raw");
    // Written with O_DIRECT, so none of it is cached.
    blockmirror_tests::tool_ok(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", source.display()),
            "bs=1M",
            &format!("count={}", SIZE >> 20),
            "oflag=direct",
            "status=none",
        ],
    );
    assert_eq!(resident_bytes(&source), 0, "dd oflag=direct cached pages");
    c.volumes
        .attach_volume(v1::AttachVolumeRequest {
            name: "src".into(),
            path: source.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .expect("attach");

    let target = server.path("dst-cold.raw");
    let mut s = spec(
        "src",
        &format!("file:{}", target.display()),
        CopyMode::Background,
    );
    s.auto_dismiss = Some(false);
    c.start_mirror("m", s).await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(60))
        .await;
    let cached = resident_bytes(&source);
    assert!(
        cached <= SIZE / 8,
        "the copy left {cached} of {SIZE} source bytes in the page cache"
    );
    let done = c.complete_and_wait("m", Duration::from_secs(60)).await;
    assert!(done.pivoted && done.error.is_empty(), "{done:?}");
    assert_same(
        "target file vs source file",
        &std::fs::read(&target).unwrap(),
        &std::fs::read(&source).unwrap(),
    );
}
