//! Convergence you can count on: auto mode converges where background does
//! not and does not flap under a steady load; the target-latency guard falls
//! back and retries; the memory bound holds with NBD guests far faster than
//! the target; the forecast says where a job is heading; automatic switches
//! both ways keep the target exact.

use blockmirror_proto::v1::{
    self, Convergence, CopyMode, EventType, JobState, watch_events_response::Kind,
};
use blockmirror_tests::{Clients, Guest, Load, Nbdkit, TestServer, spec};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

const SIZE: u64 = 8 << 20;

/// Copy-mode changes of `job` seen within `within`.
async fn mode_changes(c: &mut Clients, job: &str, within: Duration) -> Vec<v1::Event> {
    let mut w = c
        .jobs
        .watch_events(v1::WatchEventsRequest {
            job_id: job.into(),
            after_sequence: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, w.next()).await {
        if let Some(Kind::Event(e)) = msg.kind
            && e.r#type == EventType::CopyModeChanged as i32
        {
            out.push(e);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_converges_where_background_does_not_and_does_not_flap() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    let (mut bg_load, mut auto_load) = (None, None);
    for side in ["bg", "auto"] {
        let (src, dst) = (format!("{side}-src"), format!("{side}-dst"));
        c.create_volume(&src, SIZE).await;
        c.create_volume(&dst, SIZE).await;
        let content = c.fill_random(&src, SIZE, 17).await;
        c.limit(&dst, 2 << 20).await;
        if side == "bg" {
            let guest = Guest::new(&src, 0, content, 3);
            bg_load = Some(Load::start(&c, vec![guest], Duration::ZERO));
        } else {
            // Four guests (queue depth 4): a steady load that keeps the
            // target busy, whatever else the machine is doing.
            let guests = Load::guests(&src, &content, 4, 30);
            auto_load = Some(Load::start(&c, guests, Duration::ZERO));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.start_mirror("bg", spec("bg-src", "volume:bg-dst", CopyMode::Background))
        .await;
    let mut s = spec("auto-src", "volume:auto-dst", CopyMode::Auto);
    s.auto_diverging_window_ms = 1000;
    s.auto_min_dwell_ms = 1000;
    s.auto_dismiss = Some(false);
    c.start_mirror("auto", s).await;
    let ready = c
        .wait_for("auto", &[JobState::Ready], Duration::from_secs(120))
        .await;
    assert_eq!(ready.copy_mode, CopyMode::WriteBlocking as i32, "{ready:?}");
    // Background on the same load does not finish, and once its first pass
    // is over (a trend needs a few seconds) its forecast says so.
    let hopeless = [Convergence::Diverging as i32, Convergence::Stalled as i32];
    let deadline = Instant::now() + Duration::from_secs(15);
    let bg = loop {
        let bg = c.job("bg").await;
        assert_eq!(
            bg.state,
            JobState::Running as i32,
            "background converged after all"
        );
        if hopeless.contains(&bg.convergence) || Instant::now() > deadline {
            break bg;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(hopeless.contains(&bg.convergence), "{bg:?}");
    assert_eq!(bg.eta_to_ready_ms, None);
    // From here on only the auto job's guest runs (two guests hammering
    // one 2-core machine would measure CPU contention, not the policy).
    bg_load.take().expect("background guests").stop().await;
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "bg".into(),
            force: true,
        })
        .await
        .unwrap();
    // The same steady load for several dwell times: one switch, no flapping.
    let changes = mode_changes(&mut c, "auto", Duration::from_secs(6)).await;
    assert_eq!(changes.len(), 1, "auto flapped: {changes:?}");
    assert_eq!(changes[0].to_mode, CopyMode::WriteBlocking as i32);
    assert!(
        changes[0].reason.contains("not converging"),
        "{:?}",
        changes[0].reason
    );
    let synced = c.job("auto").await;
    assert_eq!(synced.convergence, Convergence::Synced as i32, "{synced:?}");
    auto_load.take().expect("auto guests").stop().await;
}

/// The job's next copy-mode change after event `after`: it must be to `to`.
async fn next_switch(c: &mut Clients, job: &str, after: u64, to: CopyMode) -> v1::Event {
    let change = c
        .events_until(job, after, EventType::CopyModeChanged)
        .await
        .pop()
        .expect("events_until ends with the change");
    assert_eq!(change.to_mode, to as i32, "{change:?}");
    change
}

/// The automatic switches in both directions, under concurrent guests
/// (unaligned 1 KiB writes, discards, write-zeroes): a heavy load takes auto
/// to write-blocking, a light one after READY takes it back to background, a
/// heavy one again to write-blocking; then a pivot under load. The volume
/// and the target file hold every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_switches_both_ways_keep_the_target_exact() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    let content = c.fill_random("src", SIZE, 5).await;
    c.limit("dst", 2 << 20).await;
    let heavy = Load::start(&c, Load::guests("src", &content, 4, 50), Duration::ZERO);
    let mut s = spec("src", "volume:dst", CopyMode::Auto);
    s.auto_diverging_window_ms = 200;
    s.auto_min_dwell_ms = 500;
    s.auto_dismiss = Some(false);
    c.start_mirror("m", s).await;
    let ready = c
        .wait_for("m", &[JobState::Ready], Duration::from_secs(120))
        .await;
    assert_eq!(ready.copy_mode, CopyMode::WriteBlocking as i32, "{ready:?}");

    // A light load (about one operation a second per guest): back to
    // background once it has lasted long enough.
    let light = Load::start(&c, heavy.stop().await, Duration::from_secs(1));
    let back = next_switch(&mut c, "m", ready.last_event_sequence, CopyMode::Background).await;
    assert!(back.reason.contains("guests would dirty"), "{back:?}");

    // Heavy again: background would not keep up, so write-blocking again.
    let heavy = Load::start(&c, light.stop().await, Duration::ZERO);
    let again = next_switch(&mut c, "m", back.sequence, CopyMode::WriteBlocking).await;
    assert!(again.reason.contains("not converging"), "{again:?}");

    let done = c.complete_and_wait("m", Duration::from_secs(60)).await;
    assert!(done.pivoted && done.error.is_empty(), "{done:?}");
    let guests = heavy.stop().await;
    assert!(
        guests.iter().all(|g| g.ops > 10),
        "guests made too few writes"
    );
    let model: Vec<u8> = guests.into_iter().flat_map(|g| g.model).collect();
    let vol = c.assert_volume_holds("src", &model).await;
    assert!(vol.path.ends_with("dst.raw"), "{vol:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_latency_guard_falls_back_and_retries() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    // 4 KiB writes at 128 KiB/s take ~31 ms each on the target.
    c.limit("dst", 128 << 10).await;
    let mut s = spec("src", "volume:dst", CopyMode::WriteBlocking);
    s.sync = v1::SyncMode::None as i32;
    s.target_latency_limit_ms = 10;
    s.target_latency_window_ms = 1000;
    s.auto_min_dwell_ms = 1500;
    s.auto_dismiss = Some(false);
    c.start_mirror("m", s).await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(10))
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mut c, stop) = (c.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                c.write("src", (i % 1024) * 4096, vec![7u8; 4096]).await;
                i += 1;
            }
        })
    };
    let changes = mode_changes(&mut c, "m", Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(changes.len() >= 2, "{changes:?}");
    assert_eq!(changes[0].to_mode, CopyMode::Background as i32);
    assert!(
        changes[0].reason.contains("target latency above 10 ms"),
        "{:?}",
        changes[0].reason
    );
    assert_eq!(changes[1].to_mode, CopyMode::WriteBlocking as i32);
    assert!(
        changes[1].reason.contains("retrying"),
        "{:?}",
        changes[1].reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bound_holds_with_nbd_guests_far_faster_than_the_target() {
    const BUF: u64 = 4 << 20;
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", 64 << 20).await;
    c.create_volume("dst", 64 << 20).await;
    c.export("src", false).await;
    // The guest could write hundreds of MB/s; the target takes 4 MiB/s.
    c.limit("dst", 4 << 20).await;
    let mut s = spec("src", "volume:dst", CopyMode::WriteBlocking);
    s.sync = v1::SyncMode::None as i32;
    s.buf_size_bytes = BUF;
    c.start_mirror("m", s).await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(10))
        .await;
    // Many requests, then requests far bigger than the whole budget (NBD's
    // largest, which the server reads and applies in slices).
    for (bs, depth) in [("256k", "64"), ("32m", "4")] {
        let started = Instant::now();
        let out = Command::new("fio")
            .args([
                "--name=deep",
                "--ioengine=nbd",
                &format!("--uri={}", server.nbd_uri("src")),
                "--rw=randwrite",
                &format!("--bs={bs}"),
                &format!("--iodepth={depth}"),
                "--size=64m",
                "--time_based",
                "--runtime=3",
                "--verify_state_save=0",
            ])
            .output()
            .expect("fio");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let job = c.job("m").await;
        assert!(
            job.peak_in_flight_bytes > BUF / 2,
            "{bs}: the bound was not exercised: {job:?}"
        );
        assert!(
            job.peak_in_flight_bytes <= BUF,
            "{bs}: {} bytes in flight with buf_size {BUF}",
            job.peak_in_flight_bytes
        );
        eprintln!(
            "fio {bs} x {depth} ran {:?}; peak in flight {} of {BUF}",
            started.elapsed(),
            job.peak_in_flight_bytes
        );
    }
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "m".into(),
            force: true,
        })
        .await
        .unwrap();
}

/// With no job, a volume bounds the write payloads its NBD clients have in
/// flight (`--volume-inflight-mib`): onto a volume that takes 20 ms per
/// write (nbdkit's delay filter), 1 MiB writes at queue depth 64 and 32 MiB
/// writes at depth 4 never hold more than the bound, and every byte lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_without_a_job_bounds_the_write_payloads_it_holds() {
    const BOUND: u64 = 2 << 20;
    let server = TestServer::start_with(&["--volume-inflight-mib", "2"]);
    let mut c = server.clients().await;
    for (bs, depth) in [("1m", "64"), ("32m", "4")] {
        // A volume of its own per case, so each peak is its own.
        let name = format!("slow-{bs}");
        let sock = server.dir.path().join(format!("{name}.sock"));
        let nbdkit = Nbdkit::start_delayed(sock, "64M", "20ms").await;
        let attached = c
            .volumes
            .attach_volume(v1::AttachVolumeRequest {
                name: name.clone(),
                path: String::new(),
                direct_io: false,
                uri: nbdkit.uri(),
            })
            .await
            .expect("attach the nbdkit volume")
            .into_inner();
        assert_eq!(attached.max_in_flight_bytes, BOUND);
        c.export(&name, false).await;
        let started = Instant::now();
        // Writes the whole volume, then reads it back and checks every block.
        let out = Command::new("fio")
            .args([
                "--name=deep",
                "--ioengine=nbd",
                &format!("--uri={}", server.nbd_uri(&name)),
                "--rw=write",
                &format!("--bs={bs}"),
                &format!("--iodepth={depth}"),
                "--size=64m",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ])
            .output()
            .expect("fio");
        assert!(
            out.status.success(),
            "fio {bs} x {depth}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = c
            .volumes
            .get_volume(v1::GetVolumeRequest { name })
            .await
            .unwrap()
            .into_inner();
        assert!(
            v.peak_in_flight_bytes > BOUND / 2,
            "{bs}: the bound was not exercised: {v:?}"
        );
        assert!(
            v.peak_in_flight_bytes <= BOUND,
            "{bs}: {} bytes in flight with a bound of {BOUND}",
            v.peak_in_flight_bytes
        );
        assert_eq!(v.in_flight_bytes, 0, "{bs}: payloads left behind: {v:?}");
        eprintln!(
            "fio {bs} x {depth} wrote and verified 64 MiB in {:?}; peak in flight {} of {BOUND}",
            started.elapsed(),
            v.peak_in_flight_bytes
        );
    }
}
