//! The original bug, side by side: a guest writing faster than the target
//! accepts. Background mode never reaches READY; write-blocking does — and
//! the 2016 patch's other bugs: unbounded memory toward a slow target and a
//! mode that cannot be chosen or changed.

use blockmirror_proto::v1::{self, CopyMode, JobState, watch_events_response::Kind};
use blockmirror_tests::{Guest, TestServer, assert_same, spec};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

const SIZE: u64 = 8 << 20;
const TARGET_BPS: u64 = 2 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_blocking_converges_where_background_does_not() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    let mut guests = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    for side in ["bg", "wb"] {
        let (src, dst) = (format!("{side}-src"), format!("{side}-dst"));
        c.create_volume(&src, SIZE).await;
        c.create_volume(&dst, SIZE).await;
        let content = c.fill_random(&src, SIZE, 11).await;
        c.limit(&dst, TARGET_BPS).await;
        guests.push(Guest::new(&src, 0, content, 5).spawn(&c, &stop));
    }
    // Let the guests get going: the dirty rate is far above 2 MiB/s.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    c.start_mirror("bg", spec("bg-src", "volume:bg-dst", CopyMode::Background))
        .await;
    c.start_mirror(
        "wb",
        spec("wb-src", "volume:wb-dst", CopyMode::WriteBlocking),
    )
    .await;

    let ready = c
        .wait_for("wb", &[JobState::Ready], Duration::from_secs(120))
        .await;
    let to_ready = started.elapsed();
    assert!(ready.actively_synced, "{ready:?}");
    // Same time, same load, same target speed: background is still behind.
    let bg = c.job("bg").await;
    assert_eq!(
        bg.state,
        JobState::Running as i32,
        "background should not converge: {bg:?}"
    );
    assert!(bg.dirty_bytes > 0, "{bg:?}");
    // Guest writes that reached the target synchronously are counted apart
    // from the copier's bytes; background mode sends none.
    assert!(ready.synced_guest_bytes > 0, "{ready:?}");
    assert_eq!(bg.synced_guest_bytes, 0, "{bg:?}");
    assert!(
        bg.dirty_rate_bytes_per_sec > 0 || to_ready < Duration::from_secs(2),
        "{bg:?}"
    );

    c.jobs
        .complete_job(v1::JobRequest {
            job_id: "wb".into(),
        })
        .await
        .expect("complete");
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "bg".into(),
            force: false,
        })
        .await
        .expect("cancel background");
    let mut w = c
        .jobs
        .watch_events(v1::WatchEventsRequest {
            job_id: "wb".into(),
            after_sequence: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut completed = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(60), w.next())
        .await
        .expect("events")
        .transpose()
        .unwrap()
    {
        if let Some(Kind::Event(e)) = msg.kind
            && e.r#type == v1::EventType::BlockJobCompleted as i32
        {
            completed = Some(e);
            break;
        }
    }
    let completed = completed.expect("BLOCK_JOB_COMPLETED");
    assert!(completed.pivoted);
    stop.store(true, Ordering::Relaxed);
    let mut models = Vec::new();
    for g in guests {
        models.push(g.await.unwrap());
    }
    let wb_model = &models[1].model;
    assert_same(
        "wb volume after pivot",
        &c.read("wb-src", 0, SIZE).await,
        wb_model,
    );
    eprintln!(
        "write-blocking READY after {to_ready:?} (size/bandwidth = {:?}); background still had {} dirty bytes",
        Duration::from_secs_f64(SIZE as f64 / TARGET_BPS as f64),
        bg.dirty_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_in_flight_stay_under_buf_size_with_a_slow_target() {
    const BUF: u64 = 1 << 20;
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", 64 << 20).await;
    c.create_volume("dst", 64 << 20).await;
    c.limit("dst", 1 << 20).await;
    let mut s = spec("src", "volume:dst", CopyMode::WriteBlocking);
    // sync none: every guest write must take the synchronous path.
    s.sync = v1::SyncMode::None as i32;
    s.buf_size_bytes = BUF;
    s.granularity_bytes = 64 << 10;
    c.start_mirror("m", s).await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(10))
        .await;
    // 32 guests each with a 256 KiB write in flight: 8 MiB of demand
    // against a 1 MiB budget and a 1 MiB/s target.
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                c.write(
                    "src",
                    ((i * 2) << 20) + (done % 8) * (256 << 10),
                    vec![u8::try_from(i + 1).unwrap(); 256 << 10],
                )
                .await;
                done += 1;
            }
            done
        }));
    }
    let mut writes = 0;
    for t in tasks {
        writes += t.await.unwrap();
    }
    let job = c.job("m").await;
    assert!(writes >= 1, "no guest write completed");
    assert!(
        job.peak_in_flight_bytes > 0,
        "the synchronous path was not exercised: {job:?}"
    );
    assert!(
        job.peak_in_flight_bytes <= BUF,
        "bytes in flight reached {} with buf_size {BUF}",
        job.peak_in_flight_bytes
    );
    assert!(job.actively_synced, "{job:?}");
    // The target got exactly what the guests wrote (no uninitialised buffers).
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "m".into(),
            force: false,
        })
        .await
        .unwrap();
    let dir = server.dir.path().join("state/volumes");
    // Cancel in READY finishes without pivot; wait for the files to settle.
    let mut w = c
        .jobs
        .watch_events(v1::WatchEventsRequest {
            job_id: "m".into(),
            after_sequence: 1,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(Ok(msg)) = w.next().await {
        if let Some(Kind::Event(e)) = msg.kind
            && e.r#type == v1::EventType::BlockJobCompleted as i32
        {
            break;
        }
    }
    let src = std::fs::read(dir.join("src.raw")).unwrap();
    let dst = std::fs::read(dir.join("dst.raw")).unwrap();
    assert_same("target vs source", &dst, &src);
    eprintln!(
        "{writes} guest writes of 256 KiB; peak in flight {} of {BUF}",
        job.peak_in_flight_bytes
    );
}

/// tonic decodes a request's whole message before its handler runs, so
/// without the DataService's admission budget (16 MiB, server/src/grpc/
/// admission.rs) every concurrent gRPC write onto a slow volume would sit
/// decoded in memory while it waits for the volume. With it, the server
/// reads a payload only once it fits, and HTTP/2 flow control holds the
/// rest at the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_write_payloads_are_read_only_once_they_fit_the_budget() {
    const WRITES: u64 = 32;
    const LEN: u64 = 4 << 20;
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("v", WRITES * LEN).await;
    // 2 MiB/s: each 4 MiB write waits for the volume's limit.
    c.limit("v", 2 << 20).await;
    c.write("v", 0, vec![0; 4096]).await;
    let idle = server.rss_bytes();
    // 128 MiB of writes on one connection at once.
    let mut tasks = Vec::new();
    for i in 0..WRITES {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.write("v", i * LEN, vec![u8::try_from(i + 1).unwrap(); 4 << 20])
                .await;
        }));
    }
    let mut peak = idle;
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        peak = peak.max(server.rss_bytes());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let growth = peak.saturating_sub(idle);
    // Lift the limit so the writes finish, then check every one landed.
    c.limit("v", 0).await;
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("every write finishes once the limit is lifted")
            .unwrap();
    }
    for i in 0..WRITES {
        let back = c.read("v", i * LEN, LEN).await;
        let want = u8::try_from(i + 1).unwrap();
        assert!(
            back.iter().all(|&b| b == want),
            "write {i} did not land whole"
        );
    }
    eprintln!(
        "RSS growth with {WRITES} writes of {} MiB in flight: {:.1} MiB",
        LEN >> 20,
        growth as f64 / f64::from(1 << 20)
    );
    // Budget 16 MiB, plus at most one 64 KiB stream window per waiting
    // write, plus the engine's own buffers: well under the 128 MiB that
    // decoding everything at once would hold.
    assert!(
        growth < 48 << 20,
        "RSS grew by {growth} bytes with {WRITES} × {LEN} bytes of writes in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_mode_is_chosen_per_job_and_changed_both_ways() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", 4 << 20).await;
    c.create_volume("dst", 4 << 20).await;
    let mut s = spec("src", "volume:dst", CopyMode::WriteBlocking);
    s.auto_dismiss = Some(false);
    let j = c.start_mirror("m", s).await;
    assert_eq!(j.copy_mode, CopyMode::WriteBlocking as i32);
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(10))
        .await;
    assert!(c.job("m").await.actively_synced);
    let after = c.job("m").await.last_event_sequence;
    let j = c
        .jobs
        .change_job(v1::ChangeJobRequest {
            job_id: "m".into(),
            copy_mode: CopyMode::Background as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.copy_mode, CopyMode::Background as i32);
    assert!(!j.actively_synced);
    let j = c
        .jobs
        .change_job(v1::ChangeJobRequest {
            job_id: "m".into(),
            copy_mode: CopyMode::WriteBlocking as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.copy_mode, CopyMode::WriteBlocking as i32);
    let mut w = c
        .jobs
        .watch_events(v1::WatchEventsRequest {
            job_id: "m".into(),
            after_sequence: after,
        })
        .await
        .unwrap()
        .into_inner();
    let mut changes = Vec::new();
    while changes.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Kind::Event(e)) = msg.kind
            && e.r#type == v1::EventType::CopyModeChanged as i32
        {
            changes.push((e.from_mode, e.to_mode, e.reason));
        }
    }
    assert_eq!(changes[0].0, CopyMode::WriteBlocking as i32);
    assert_eq!(changes[0].1, CopyMode::Background as i32);
    assert_eq!(changes[1].1, CopyMode::WriteBlocking as i32);
    assert_eq!(changes[0].2, "requested");
}
