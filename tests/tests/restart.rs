//! State across restarts and graceful shutdown: volume definitions and
//! limits persist, a pivot once done stays done, SIGTERM finishes or refuses
//! in-flight guest I/O (never half-acknowledges it) and saves job records.

use blockmirror_proto::v1::{self, CopyMode, JobState};
use blockmirror_tests::{TestServer, assert_same, spec};
use bytes::Bytes;
use std::time::Duration;

const SIZE: u64 = 8 << 20;

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
    let mut s = spec("src", "volume:dst", CopyMode::WriteBlocking);
    s.auto_dismiss = Some(false);
    c.start_mirror("m", s).await;
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

    // The job record was saved; after a restart it says it was interrupted.
    let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    let server = TestServer::start_in(dir, &[]);
    let mut c = server.clients().await;
    let j = c.job("m").await;
    assert_eq!(j.state, JobState::Concluded as i32, "{j:?}");
    assert!(j.error.contains("interrupted"), "{j:?}");
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "src".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(v.job_id.is_empty() && v.path.ends_with("src.raw"), "{v:?}");
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
