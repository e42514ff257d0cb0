//! State across restarts and graceful shutdown: volume definitions and
//! limits persist, a pivot once done stays done, SIGTERM finishes or refuses
//! in-flight guest I/O (never half-acknowledges it) and saves job records.

use blockmirror_proto::v1::{self, CopyMode, JobState};
use blockmirror_tests::{Clients, TestServer, assert_same, spec};
use bytes::Bytes;
use std::time::Duration;

const SIZE: u64 = 8 << 20;

/// Starts job "m" from volume "src" to volume "dst", kept after it
/// concludes (no auto-dismiss) so a restart finds its record.
async fn start_kept(c: &mut Clients, mode: CopyMode, sync: v1::SyncMode) -> v1::Job {
    let mut s = spec("src", "volume:dst", mode);
    s.sync = sync as i32;
    s.auto_dismiss = Some(false);
    c.start_mirror("m", s).await
}

/// Job "m" after a restart: running again (or about to, or already READY
/// again when little was left to copy), and the same job as `before`
/// (records keep creation times to the millisecond).
async fn resumed(c: &mut Clients, before: &v1::Job) -> v1::Job {
    let j = c.job("m").await;
    assert!(
        [JobState::Created, JobState::Running, JobState::Ready].contains(&j.state()),
        "the job resumes after a restart: {j:?}"
    );
    let ms = |j: &v1::Job| {
        j.created_at
            .as_ref()
            .map(|t| (t.seconds, t.nanos / 1_000_000))
    };
    assert_eq!(ms(&j), ms(before), "same job, same creation time");
    j
}

/// A new server on the state directory of one that was stopped or killed.
fn restart(old: &mut TestServer) -> TestServer {
    let dir = std::mem::replace(&mut old.dir, tempfile::tempdir().unwrap());
    TestServer::start_in(dir, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_limits_and_pivot_survive_a_restart() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    let content = c.fill_random("src", SIZE, 9).await;
    c.limit("src", 123 << 20).await;
    c.start_mirror("m", spec("src", "volume:dst", CopyMode::WriteBlocking))
        .await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(30))
        .await;
    // Keep the job record: auto-dismiss would remove it.
    c.jobs
        .complete_job(v1::JobRequest { job_id: "m".into() })
        .await
        .unwrap();
    let mut w = c.clone();
    // auto_dismiss is on: the job ends in null; wait for the pivot via the volume.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = w
            .volumes
            .get_volume(v1::GetVolumeRequest { name: "src".into() })
            .await
            .unwrap()
            .into_inner();
        if v.path.ends_with("dst.raw") && v.job_id.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no pivot: {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(c);
    drop(w);
    let dir = server.stop();

    let server = TestServer::start_in(dir, &[]);
    let mut c = server.clients().await;
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "src".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        v.path.ends_with("dst.raw"),
        "the pivot must survive a restart: {v:?}"
    );
    assert_eq!(v.limits.unwrap().write_bytes_per_sec, 123 << 20);
    assert_eq!(v.size_bytes, SIZE);
    assert_same(
        "volume content after restart",
        &c.read("src", 0, SIZE).await,
        &content,
    );
    let names: Vec<String> = c
        .volumes
        .list_volumes(v1::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    // The target volume was absorbed into "src" at the pivot.
    assert_eq!(names, vec!["src".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_keeps_every_acknowledged_write_and_saves_jobs() {
    let mut server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    c.limit("dst", 512 << 10).await;
    let started = start_kept(&mut c, CopyMode::WriteBlocking, v1::SyncMode::Full).await;
    c.wait_for(
        "m",
        &[JobState::Running, JobState::Ready],
        Duration::from_secs(10),
    )
    .await;
    // A guest writing block i with byte pattern i; it records what was acknowledged.
    let writer = {
        let mut c = c.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..(SIZE / 65536) {
                let r = c
                    .data
                    .write(v1::WriteRequest {
                        volume: "src".into(),
                        offset_bytes: i * 65536,
                        data: Bytes::from(vec![(i % 251) as u8 + 1; 65536]),
                        fua: false,
                    })
                    .await;
                match r {
                    Ok(_) => acked.push(i),
                    Err(_) => break,
                }
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = server.terminate();
    assert!(
        status.success(),
        "blockmirrord exited with {status}; log:\n{}",
        server.log()
    );
    let acked = writer.await.unwrap();
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before shutdown"
    );
    let file = std::fs::read(server.dir.path().join("state/volumes/src.raw")).unwrap();
    for &i in &acked {
        let block =
            &file[usize::try_from(i * 65536).unwrap()..usize::try_from((i + 1) * 65536).unwrap()];
        assert!(
            block.iter().all(|&b| b == (i % 251) as u8 + 1),
            "acknowledged block {i} was lost"
        );
    }
    let log = server.log();
    assert!(log.contains("stopped"), "no clean stop in the log:\n{log}");

    // The job record (and its dirty bitmap) was saved; after a restart the
    // job resumes and converges.
    drop(c);
    let server = restart(&mut server);
    let mut c = server.clients().await;
    let j = resumed(&mut c, &started).await;
    assert!(j.error.is_empty(), "{j:?}");
    assert!(
        server.log().contains("job resumed after a restart"),
        "{}",
        server.log()
    );
    c.limit("dst", 0).await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(60))
        .await;
    let source = std::fs::read(server.dir.path().join("state/volumes/src.raw")).unwrap();
    assert_same(
        "target after the resumed job's READY",
        &std::fs::read(server.dir.path().join("state/volumes/dst.raw")).unwrap(),
        &source,
    );
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "m".into(),
            force: false,
        })
        .await
        .unwrap();
    c.wait_for("m", &[JobState::Concluded], Duration::from_secs(30))
        .await;
    c.jobs
        .dismiss_job(v1::JobRequest { job_id: "m".into() })
        .await
        .unwrap();
    assert_eq!(
        c.jobs
            .get_job(v1::GetJobRequest { job_id: "m".into() })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
}

/// Waits until job "m" has copied at least `bytes`.
async fn wait_copied(c: &mut Clients, bytes: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let j = c.job("m").await;
        if j.copied_bytes >= bytes {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "copy too slow: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A clean stop saves the job's dirty bitmap; the resumed job copies only
/// what was left (plus what guests wrote into the copied part) and the
/// target ends equal to every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cleanly_stopped_job_resumes_from_its_saved_bitmap() {
    const BIG: u64 = 32 << 20;
    let mut server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", BIG).await;
    c.create_volume("dst", BIG).await;
    let mut model = c.fill_random("src", BIG, 11).await;
    c.limit("dst", 8 << 20).await;
    let started = start_kept(&mut c, CopyMode::Background, v1::SyncMode::Full).await;
    wait_copied(&mut c, BIG / 2).await;
    // Guests rewrite part of what is already copied: unaligned 1 KiB writes
    // and a discard, all below the copier's cursor.
    for i in 0..16u64 {
        let off = i * 397 * 1024 + 512;
        let data = vec![u8::try_from(i).unwrap() + 1; 1024];
        c.write("src", off, data.clone()).await;
        let at = usize::try_from(off).unwrap();
        model[at..at + 1024].copy_from_slice(&data);
    }
    c.data
        .discard(v1::DiscardRequest {
            volume: "src".into(),
            offset_bytes: 3 << 20,
            length_bytes: 256 << 10,
        })
        .await
        .unwrap();
    model[3 << 20..(3 << 20) + (256 << 10)].fill(0);
    drop(c);
    assert!(server.terminate().success(), "{}", server.log());
    let jobs = server.dir.path().join("state/jobs");
    assert!(jobs.join("m.bitmap").exists(), "{}", server.log());
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(jobs.join("m.json")).unwrap()).unwrap();
    assert_eq!(rec["dirty_bitmap_saved"], true, "{rec}");

    let server = restart(&mut server);
    let mut c = server.clients().await;
    resumed(&mut c, &started).await;
    assert!(
        server
            .log()
            .contains("from the dirty bitmap its shutdown saved"),
        "{}",
        server.log()
    );
    assert!(
        !jobs.join("m.bitmap").exists(),
        "a bitmap serves one resume"
    );
    c.limit("dst", 0).await;
    let ready = c
        .wait_for("m", &[JobState::Ready], Duration::from_secs(60))
        .await;
    assert!(
        ready.copied_bytes > 0 && ready.copied_bytes <= BIG * 5 / 8,
        "the resumed job copied {} of {BIG} bytes",
        ready.copied_bytes
    );
    let done = c.complete_and_wait("m", Duration::from_secs(30)).await;
    assert!(done.pivoted && done.error.is_empty(), "{done:?}");
    assert_same("pivoted volume", &c.read("src", 0, BIG).await, &model);
}

/// A saved bitmap that is damaged (or of another job's size) is not
/// trusted: the resumed job copies everything, and the copy is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_saved_bitmap_means_a_full_copy() {
    let mut server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    let content = c.fill_random("src", SIZE, 13).await;
    c.limit("dst", 1 << 20).await;
    start_kept(&mut c, CopyMode::Background, v1::SyncMode::Full).await;
    wait_copied(&mut c, 1 << 20).await;
    drop(c);
    assert!(server.terminate().success(), "{}", server.log());
    let bitmap = server.dir.path().join("state/jobs/m.bitmap");
    let mut bytes = std::fs::read(&bitmap).unwrap();
    bytes.truncate(bytes.len() - 8);
    std::fs::write(&bitmap, bytes).unwrap();

    let server = restart(&mut server);
    let mut c = server.clients().await;
    c.limit("dst", 0).await;
    let ready = c
        .wait_for("m", &[JobState::Ready], Duration::from_secs(30))
        .await;
    assert!(
        server.log().contains("saved dirty bitmap not used"),
        "{}",
        server.log()
    );
    assert_eq!(ready.copied_bytes, SIZE, "{ready:?}");
    assert_same(
        "target after a full copy",
        &std::fs::read(server.dir.path().join("state/volumes/dst.raw")).unwrap(),
        &content,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_resumes_after_a_crash_and_the_pivot_is_exact() {
    let mut server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    c.fill_random("src", SIZE, 21).await;
    c.limit("dst", 1 << 20).await;
    let before = start_kept(&mut c, CopyMode::WriteBlocking, v1::SyncMode::Full).await;
    c.wait_for("m", &[JobState::Running], Duration::from_secs(10))
        .await;
    // Unaligned 1 KiB writes while the copy runs, until the crash.
    let writer = {
        let mut c = c.clone();
        tokio::spawn(async move {
            for i in 0u64.. {
                let r = c
                    .data
                    .write(v1::WriteRequest {
                        volume: "src".into(),
                        offset_bytes: (i * 7919 * 1024 + 1) % (SIZE - 1024),
                        data: Bytes::from(vec![(i % 253) as u8; 1024]),
                        fua: false,
                    })
                    .await;
                if r.is_err() {
                    break;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mid = c.job("m").await;
    assert!(
        mid.dirty_bytes > 0,
        "the copy should still be running: {mid:?}"
    );
    server.kill();
    writer.await.unwrap();
    drop(c);

    let server = restart(&mut server);
    let mut c = server.clients().await;
    resumed(&mut c, &before).await;
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "src".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.job_id, "m", "{v:?}");
    // Guests keep writing (1 KiB at odd offsets, discards, zeroes) while
    // the resumed job copies everything again; then complete and compare.
    c.limit("dst", 0).await;
    let initial = c.read("src", 0, SIZE).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guest = blockmirror_tests::Guest::new("src", 0, initial, 77).spawn(&c, &stop);
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let guest = guest.await.unwrap();
    assert!(guest.ops > 0, "the guest never wrote");
    let done = c.complete_and_wait("m", Duration::from_secs(30)).await;
    assert!(done.pivoted && done.error.is_empty(), "{done:?}");
    assert_same(
        "pivoted volume after a crash and a resumed job",
        &c.read("src", 0, SIZE).await,
        &guest.model,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_resume_is_concluded_with_the_reason() {
    let mut server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    c.limit("dst", 256 << 10).await;
    start_kept(&mut c, CopyMode::Background, v1::SyncMode::Full).await;
    c.wait_for("m", &[JobState::Running], Duration::from_secs(10))
        .await;
    drop(c);
    let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    assert!(server.terminate().success(), "{}", server.log());
    // The target's file disappears while blockmirrord is down.
    std::fs::remove_file(dir.path().join("state/volumes/dst.raw")).unwrap();

    let server = TestServer::start_in(dir, &[]);
    let mut c = server.clients().await;
    let j = c.job("m").await;
    assert_eq!(j.state(), JobState::Concluded, "{j:?}");
    assert!(
        j.error.contains("could not resume") && j.error.contains("dst"),
        "the reason names what is missing: {j:?}"
    );
    // The source is free again.
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "src".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(v.job_id.is_empty(), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_sync_none_job_copies_everything() {
    // sync=none copies only what guests write after the start; the writes it
    // tracked die with the process, so the resumed job must copy it all.
    let mut server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    let content = c.fill_random("src", SIZE, 5).await;
    start_kept(&mut c, CopyMode::Background, v1::SyncMode::None).await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(10))
        .await;
    let dst = server.dir.path().join("state/volumes/dst.raw");
    assert!(
        std::fs::read(&dst).unwrap().iter().all(|&b| b == 0),
        "sync=none copied nothing before the restart"
    );
    drop(c);
    server.kill();

    let server = restart(&mut server);
    let mut c = server.clients().await;
    c.wait_for("m", &[JobState::Ready], Duration::from_secs(30))
        .await;
    assert_same(
        "target of the resumed sync=none job",
        &std::fs::read(server.dir.path().join("state/volumes/dst.raw")).unwrap(),
        &content,
    );
}

/// Rewrites a saved job record as a crash at the wrong moment would have
/// left it.
fn edit_record(dir: &std::path::Path, id: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(format!("state/jobs/{id}.json"));
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut rec);
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_pivot_and_record_or_during_a_cancel_is_not_resumed() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    for v in ["a", "a-dst", "b", "b-dst"] {
        c.create_volume(v, SIZE).await;
    }
    let content = c.fill_random("a", SIZE, 3).await;
    for (id, src, dst) in [
        ("pivot", "a", "volume:a-dst"),
        ("cancel", "b", "volume:b-dst"),
    ] {
        let mut s = spec(src, dst, CopyMode::WriteBlocking);
        s.auto_dismiss = Some(false);
        c.start_mirror(id, s).await;
        c.wait_for(id, &[JobState::Ready], Duration::from_secs(30))
            .await;
    }
    c.jobs
        .complete_job(v1::JobRequest {
            job_id: "pivot".into(),
        })
        .await
        .unwrap();
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "cancel".into(),
            force: false,
        })
        .await
        .unwrap();
    for id in ["pivot", "cancel"] {
        c.wait_for(id, &[JobState::Concluded], Duration::from_secs(30))
            .await;
    }
    drop(c);
    let dir = server.stop();
    // The pivot's volume definitions were saved, its record was not; the
    // cancel was asked for in READY and the job was still waiting.
    edit_record(dir.path(), "pivot", |r| {
        r["status"] = "pending".into();
        r["pivoted"] = false.into();
    });
    edit_record(dir.path(), "cancel", |r| r["status"] = "waiting".into());

    let server = TestServer::start_in(dir, &[]);
    let mut c = server.clients().await;
    let p = c.job("pivot").await;
    assert_eq!(p.state(), JobState::Concluded, "{p:?}");
    assert!(p.pivoted && p.error.is_empty(), "{p:?}");
    let x = c.job("cancel").await;
    assert_eq!(x.state(), JobState::Concluded, "{x:?}");
    assert!(!x.pivoted, "{x:?}");
    for v in ["a", "b", "b-dst"] {
        let v = c
            .volumes
            .get_volume(v1::GetVolumeRequest { name: v.into() })
            .await
            .unwrap()
            .into_inner();
        assert!(v.job_id.is_empty(), "no job resumed on {v:?}");
    }
    assert_same("pivoted volume", &c.read("a", 0, SIZE).await, &content);
    assert!(
        !server.log().contains("job resumed after a restart"),
        "{}",
        server.log()
    );
}
