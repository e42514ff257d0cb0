//! The QEMU job life cycle: cancel before and in READY, force cancel,
//! finalize and dismiss, every verb in every state it is illegal in, and
//! StartMirror idempotency.

use blockmirror_proto::v1::{self, CopyMode, EventType, JobState, watch_events_response::Kind};
use blockmirror_tests::{Clients, TestServer, assert_same, spec};
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

const SIZE: u64 = 8 << 20;

/// A source full of data and a target (optionally slow).
async fn pair(c: &mut Clients, name: &str, target_bps: u64) {
    c.create_volume(&format!("{name}-src"), SIZE).await;
    c.create_volume(&format!("{name}-dst"), SIZE).await;
    c.fill_random(&format!("{name}-src"), SIZE, 3).await;
    if target_bps > 0 {
        c.limit(&format!("{name}-dst"), target_bps).await;
    }
}

fn kept(name: &str) -> v1::MirrorSpec {
    let mut s = spec(
        &format!("{name}-src"),
        &format!("volume:{name}-dst"),
        CopyMode::Background,
    );
    s.auto_dismiss = Some(false);
    s
}

fn types(events: &[v1::Event]) -> Vec<i32> {
    events.iter().map(|e| e.r#type).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_ready_is_cancelled_and_dismiss_forgets() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    pair(&mut c, "a", 256 << 10).await;
    let j = c.start_mirror("a", kept("a")).await;
    assert!(
        j.state == JobState::Created as i32 || j.state == JobState::Running as i32,
        "{j:?}"
    );
    c.wait_for("a", &[JobState::Running], Duration::from_secs(10))
        .await;
    let after = c.job("a").await.last_event_sequence;
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "a".into(),
            force: false,
        })
        .await
        .unwrap();
    let ev = c
        .events_until("a", after, EventType::BlockJobCancelled)
        .await;
    assert!(!types(&ev).contains(&(EventType::BlockJobCompleted as i32)));
    let j = c
        .wait_for("a", &[JobState::Concluded], Duration::from_secs(10))
        .await;
    assert!(!j.pivoted && j.error.is_empty(), "{j:?}");
    // The volumes are free again.
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest {
            name: "a-src".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.job_id.is_empty(), "{v:?}");
    let j = c
        .jobs
        .dismiss_job(v1::JobRequest { job_id: "a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state, JobState::Null as i32);
    let err = c
        .jobs
        .get_job(v1::GetJobRequest { job_id: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_cancel_in_ready_is_cancelled_without_pivot() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    pair(&mut c, "f", 0).await;
    c.start_mirror("f", kept("f")).await;
    c.wait_for("f", &[JobState::Ready], Duration::from_secs(30))
        .await;
    let after = c.job("f").await.last_event_sequence;
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "f".into(),
            force: true,
        })
        .await
        .unwrap();
    let ev = c
        .events_until("f", after, EventType::BlockJobCancelled)
        .await;
    assert_eq!(ev[0].r#type, EventType::JobStatusChange as i32);
    assert_eq!(ev[0].state, JobState::Aborting as i32);
    let j = c.job("f").await;
    assert_eq!(j.state, JobState::Concluded as i32);
    assert!(!j.pivoted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_finalize_pivots_and_events_follow_qemu_order() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    pair(&mut c, "p", 0).await;
    let mut s = kept("p");
    s.auto_finalize = Some(false);
    s.copy_mode = CopyMode::WriteBlocking as i32;
    c.start_mirror("p", s).await;
    let ev = c.events_until("p", 0, EventType::BlockJobReady).await;
    let last = ev.last().unwrap().sequence;
    c.jobs
        .complete_job(v1::JobRequest { job_id: "p".into() })
        .await
        .unwrap();
    let ev = c.events_until("p", last, EventType::BlockJobPending).await;
    let states: Vec<i32> = ev
        .iter()
        .filter(|e| e.r#type == EventType::JobStatusChange as i32)
        .map(|e| e.state)
        .collect();
    assert_eq!(
        states,
        vec![JobState::Waiting as i32, JobState::Pending as i32]
    );
    // Pending holds: no pivot until finalize.
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest {
            name: "p-src".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.path.ends_with("p-src.raw"), "{v:?}");
    c.jobs
        .finalize_job(v1::JobRequest { job_id: "p".into() })
        .await
        .unwrap();
    let ev = c
        .events_until(
            "p",
            ev.last().unwrap().sequence,
            EventType::BlockJobCompleted,
        )
        .await;
    let done = ev.last().unwrap();
    assert!(done.pivoted, "{done:?}");
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest {
            name: "p-src".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.path.ends_with("p-dst.raw"), "{v:?}");
    let old = std::fs::read(server.dir.path().join("state/volumes/p-src.raw")).unwrap();
    let new = std::fs::read(&v.path).unwrap();
    assert_same("target vs old source at pivot", &new, &old);
}

const VERBS: [&str; 8] = [
    "pause",
    "resume",
    "set-speed",
    "change",
    "complete",
    "cancel",
    "finalize",
    "dismiss",
];

fn allowed(state: JobState, verb: &str) -> bool {
    use JobState::*;
    match verb {
        "cancel" => matches!(
            state,
            Created | Running | Paused | Ready | Standby | Waiting | Pending
        ),
        "pause" | "resume" | "set-speed" => {
            matches!(state, Created | Running | Paused | Ready | Standby)
        }
        "change" => matches!(state, Running | Paused | Ready | Standby),
        "complete" => state == Ready,
        "finalize" => state == Pending,
        "dismiss" => state == Concluded,
        _ => unreachable!("unknown verb {verb}"),
    }
}

async fn call(c: &mut Clients, id: &str, verb: &str) -> Result<v1::Job, tonic::Status> {
    let job_id = id.to_owned();
    let r = v1::JobRequest {
        job_id: job_id.clone(),
    };
    let out = match verb {
        "pause" => c.jobs.pause_job(r).await,
        "resume" => c.jobs.resume_job(r).await,
        "set-speed" => {
            c.jobs
                .set_job_speed(v1::SetJobSpeedRequest {
                    job_id,
                    speed_bytes_per_sec: 1 << 20,
                })
                .await
        }
        "change" => {
            c.jobs
                .change_job(v1::ChangeJobRequest {
                    job_id,
                    copy_mode: CopyMode::WriteBlocking as i32,
                })
                .await
        }
        "complete" => c.jobs.complete_job(r).await,
        "cancel" => {
            c.jobs
                .cancel_job(v1::CancelJobRequest {
                    job_id,
                    force: false,
                })
                .await
        }
        "finalize" => c.jobs.finalize_job(r).await,
        "dismiss" => c.jobs.dismiss_job(r).await,
        _ => unreachable!("unknown verb {verb}"),
    };
    out.map(tonic::Response::into_inner)
}

/// Calls every verb that `state` forbids and checks the refusal.
async fn refuse_illegal(c: &mut Clients, id: &str, state: JobState) {
    let now = c.job(id).await;
    assert_eq!(
        now.state, state as i32,
        "job {id} is not {state:?}: {now:?}"
    );
    let name = state
        .as_str_name()
        .trim_start_matches("JOB_STATE_")
        .to_lowercase();
    for verb in VERBS.iter().filter(|v| !allowed(state, v)) {
        let err = call(c, id, verb)
            .await
            .expect_err(&format!("{verb} must be refused in {name}"));
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{verb} in {name}: {err:?}"
        );
        assert!(
            err.message().contains(&format!("is {name};")),
            "{verb} in {name}: message {:?} must name the state",
            err.message()
        );
    }
    assert_eq!(
        c.job(id).await.state,
        state as i32,
        "refused verbs changed the state of {id}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_illegal_verb_is_refused_in_every_state() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    // running / paused: a slow target keeps the job from READY.
    pair(&mut c, "slow", 128 << 10).await;
    c.start_mirror("slow", kept("slow")).await;
    c.wait_for("slow", &[JobState::Running], Duration::from_secs(10))
        .await;
    refuse_illegal(&mut c, "slow", JobState::Running).await;
    c.jobs
        .pause_job(v1::JobRequest {
            job_id: "slow".into(),
        })
        .await
        .unwrap();
    refuse_illegal(&mut c, "slow", JobState::Paused).await;

    // ready / standby / pending / concluded: a fast job with manual finalize.
    pair(&mut c, "fast", 0).await;
    let mut s = kept("fast");
    s.auto_finalize = Some(false);
    c.start_mirror("fast", s).await;
    c.wait_for("fast", &[JobState::Ready], Duration::from_secs(30))
        .await;
    refuse_illegal(&mut c, "fast", JobState::Ready).await;
    c.jobs
        .pause_job(v1::JobRequest {
            job_id: "fast".into(),
        })
        .await
        .unwrap();
    refuse_illegal(&mut c, "fast", JobState::Standby).await;
    c.jobs
        .resume_job(v1::JobRequest {
            job_id: "fast".into(),
        })
        .await
        .unwrap();
    c.jobs
        .complete_job(v1::JobRequest {
            job_id: "fast".into(),
        })
        .await
        .unwrap();
    c.wait_for("fast", &[JobState::Pending], Duration::from_secs(30))
        .await;
    refuse_illegal(&mut c, "fast", JobState::Pending).await;
    c.jobs
        .finalize_job(v1::JobRequest {
            job_id: "fast".into(),
        })
        .await
        .unwrap();
    c.wait_for("fast", &[JobState::Concluded], Duration::from_secs(30))
        .await;
    refuse_illegal(&mut c, "fast", JobState::Concluded).await;
    c.jobs
        .dismiss_job(v1::JobRequest {
            job_id: "fast".into(),
        })
        .await
        .unwrap();
    // null: the job is gone.
    for verb in VERBS {
        let err = call(&mut c, "fast", verb).await.expect_err("no such job");
        assert_eq!(err.code(), Code::NotFound, "{verb}: {err:?}");
    }
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "slow".into(),
            force: true,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_mirror_is_idempotent_on_job_id() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    pair(&mut c, "i", 256 << 10).await;
    let first = c.start_mirror("i", kept("i")).await;
    let again = c.start_mirror("i", kept("i")).await;
    assert_eq!(first.id, again.id);
    assert_eq!(
        first.created_at, again.created_at,
        "the same job, not a new one"
    );
    assert_eq!(
        c.jobs
            .list_jobs(v1::ListJobsRequest {})
            .await
            .unwrap()
            .into_inner()
            .jobs
            .len(),
        1
    );
    let mut other = kept("i");
    other.granularity_bytes = 128 << 10;
    let err = c
        .jobs
        .start_mirror(v1::StartMirrorRequest {
            job_id: "i".into(),
            spec: Some(other),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // A second job on a volume already in use is refused.
    c.create_volume("i-dst2", SIZE).await;
    let err = c
        .jobs
        .start_mirror(v1::StartMirrorRequest {
            job_id: "i2".into(),
            spec: Some(spec("i-src", "volume:i-dst2", CopyMode::Background)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // So is deleting a volume a job uses.
    let err = c
        .volumes
        .delete_volume(v1::DeleteVolumeRequest {
            name: "i-src".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "i".into(),
            force: true,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_replays_in_order_and_reports_out_of_range() {
    let server = TestServer::start_with(&["--event-history", "6", "--heartbeat-secs", "1"]);
    let mut c = server.clients().await;
    pair(&mut c, "w", 0).await;
    c.start_mirror("w", kept("w")).await;
    c.wait_for("w", &[JobState::Ready], Duration::from_secs(30))
        .await;
    for _ in 0..3 {
        c.jobs
            .pause_job(v1::JobRequest { job_id: "w".into() })
            .await
            .unwrap();
        c.jobs
            .resume_job(v1::JobRequest { job_id: "w".into() })
            .await
            .unwrap();
    }
    let latest = c.job("w").await.last_event_sequence;
    assert!(latest > 8, "latest sequence {latest}");
    // Too old: those events were dropped from the history of 6.
    let err = match c
        .jobs
        .watch_events(v1::WatchEventsRequest {
            job_id: String::new(),
            after_sequence: 1,
        })
        .await
    {
        Ok(mut s) => s
            .get_mut()
            .next()
            .await
            .expect("an item")
            .expect_err("out of range"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // In range: a snapshot first, then exactly the kept events, in order, then heartbeats.
    let mut w = c
        .jobs
        .watch_events(v1::WatchEventsRequest {
            job_id: String::new(),
            after_sequence: latest - 4,
        })
        .await
        .unwrap()
        .into_inner();
    let first = w.next().await.unwrap().unwrap();
    match first.kind {
        Some(Kind::Snapshot(j)) => assert_eq!(j.id, "w"),
        other => panic!("expected a snapshot first, got {other:?}"),
    }
    let mut seqs = Vec::new();
    let heartbeat = loop {
        match w.next().await.unwrap().unwrap().kind {
            Some(Kind::Event(e)) if e.r#type != EventType::Progress as i32 => seqs.push(e.sequence),
            Some(Kind::Heartbeat(h)) => break h,
            _ => {}
        }
    };
    assert_eq!(seqs, ((latest - 3)..=latest).collect::<Vec<_>>());
    assert_eq!(heartbeat.latest_sequence, latest);
    // From the future.
    let err = match c
        .jobs
        .watch_events(v1::WatchEventsRequest {
            job_id: String::new(),
            after_sequence: latest + 100,
        })
        .await
    {
        Ok(mut s) => s
            .get_mut()
            .next()
            .await
            .expect("an item")
            .expect_err("out of range"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
}
