//! Telemetry end to end: blockmirrord exports spans and metrics over OTLP/gRPC
//! to a receiver inside this test process (opentelemetry-proto's collector
//! services), serves Prometheus text on `--metrics-listen`, and continues
//! the trace of a caller that sends `traceparent` — including mirrorctl's
//! own. The sample ratio is 0, so the only write spans are the slow writes
//! (forced by a mirror target limited to 4 writes a second, in
//! write-blocking mode) and writes inside a sampled caller's trace.

use blockmirror_proto::v1::{self, CopyMode, JobState, SyncMode};
use blockmirror_tests::otlp::{ReceivedSpan, Receiver};
use blockmirror_tests::{Nbdkit, TestServer, binary, spec, tool_ok};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SIZE: u64 = 4 << 20;
/// Spans and metrics must arrive within this (the batch delay is 100 ms).
const DEADLINE: Duration = Duration::from_secs(20);

const TRACE_START: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_START: &str = "00f067aa0ba902b7";
const TRACE_WRITE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_WRITE: &str = "b7ad6b7169203331";

fn with_traceparent<T>(msg: T, trace: &str, parent: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-01").parse().unwrap(),
    );
    req
}

/// The address in the server's `metrics listening ... addr=Some(IP:PORT)` line.
fn metrics_addr(log: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains("metrics listening"))
        .unwrap_or_else(|| panic!("no metrics listener in the log:\n{log}"));
    let start = line.find("addr=Some(").expect("addr field") + "addr=Some(".len();
    let end = line[start..].find(')').expect("closing paren") + start;
    line[start..end].to_owned()
}

/// GET /metrics; the body.
async fn scrape(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// Prometheus text as `metric name -> [(labels, value)]`.
fn parse_prometheus(text: &str) -> HashMap<String, Vec<(String, f64)>> {
    let mut out: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        out.entry(name.to_owned())
            .or_default()
            .push((labels.to_owned(), value));
    }
    out
}

fn total(m: &HashMap<String, Vec<(String, f64)>>, name: &str) -> f64 {
    m.get(name).map_or(0.0, |v| v.iter().map(|(_, x)| x).sum())
}

fn find(spans: &[ReceivedSpan], f: impl Fn(&ReceivedSpan) -> bool) -> Option<&ReceivedSpan> {
    spans.iter().find(|s| f(s))
}

/// Polls the receiver until `done` holds for its spans; panics with them
/// after the deadline.
async fn spans_until(
    rx: &Receiver,
    what: &str,
    done: impl Fn(&[ReceivedSpan]) -> bool,
) -> Vec<ReceivedSpan> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let spans = rx.spans();
        if done(&spans) {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not received within {DEADLINE:?}; spans: {:#?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.name, &s.attributes))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_their_collectors() {
    let rx = Receiver::start("127.0.0.1:0").await.expect("receiver");
    let endpoint = rx.endpoint();
    let server = TestServer::start_with_env(
        &[
            "--trace-write-sample-ratio",
            "0",
            "--trace-slow-write-ms",
            "100",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "blockmirrord-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ],
    );
    let metrics = metrics_addr(&server.log());
    let mut c = server.clients().await;
    for v in ["fast", "src", "dst"] {
        c.create_volume(v, SIZE).await;
    }
    c.export("fast", false).await;
    c.export("src", false).await;
    // The target takes 4 writes a second: a write-blocking guest write
    // waits about 250 ms for it, over the 100 ms slow-write threshold.
    c.volumes
        .set_volume_limits(v1::SetVolumeLimitsRequest {
            name: "dst".into(),
            limits: Some(v1::IoLimits {
                write_bytes_per_sec: 0,
                write_iops: 4,
            }),
        })
        .await
        .unwrap();

    // A job started by a caller with a sampled trace.
    let mut s = spec("src", "volume:dst", CopyMode::WriteBlocking);
    s.sync = SyncMode::None as i32;
    s.auto_dismiss = Some(false);
    let start = v1::StartMirrorRequest {
        job_id: "j1".into(),
        spec: Some(s),
    };
    c.jobs
        .start_mirror(with_traceparent(start, TRACE_START, PARENT_START))
        .await
        .unwrap();
    c.wait_for("j1", &[JobState::Ready], DEADLINE).await;

    // 5 writes over NBD with no job: fast, so not traced at ratio 0.
    let fast = server.nbd_uri("fast");
    let mut args = vec!["-f", "raw"];
    let cmds: Vec<String> = (0..5)
        .map(|i| format!("write -P {i} {}k 4k", i * 64))
        .collect();
    for cmd in &cmds {
        args.extend(["-c", cmd]);
    }
    args.push(&fast);
    tool_ok("qemu-io", &args);
    // 3 writes to the mirrored volume: slow, each traced.
    let src = server.nbd_uri("src");
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 0 4k",
            "-c",
            "write -P 8 64k 4k",
            "-c",
            "write -P 9 128k 4k",
            &src,
        ],
    );
    // 1 gRPC write inside a sampled trace.
    let write = v1::WriteRequest {
        volume: "fast".into(),
        offset_bytes: 1 << 20,
        data: vec![3u8; 4096].into(),
        fua: false,
    };
    c.data
        .write(with_traceparent(write, TRACE_WRITE, PARENT_WRITE))
        .await
        .unwrap();
    let writes_made = 5 + 3 + 1;

    // mirrorctl with the OTEL variables: its own span, and the percentiles.
    let out = Command::new(binary("mirrorctl"))
        .arg("--socket")
        .arg(&server.socket)
        .args(["job", "show", "j1"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env_remove("OTEL_SERVICE_NAME")
        .output()
        .expect("run mirrorctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in [
        "write_latency_guest:",
        "write_latency_source:",
        "write_latency_target:",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in\n{text}"));
        assert!(
            line.contains("p50 ") && line.contains(", p99 ") && line.ends_with("(3 writes)"),
            "{line}"
        );
    }

    // A graceful cancel concludes the job, which ends its span.
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "j1".into(),
            force: false,
        })
        .await
        .unwrap();
    c.wait_for("j1", &[JobState::Concluded], DEADLINE).await;

    let spans = spans_until(&rx, "every expected span", |spans| {
        let has = |name: &str| spans.iter().any(|s| s.name == name);
        has("blockmirror.v1.JobService/StartMirror")
            && has("blockmirror.v1.DataService/Write")
            && has("blockmirror.v1.JobService/GetJob")
            && has("mirrorctl job")
            && has("mirror src")
            && has("job ready")
            && spans.iter().any(|s| s.name == "write src")
            && spans.iter().any(|s| s.name == "write fast")
    })
    .await;

    // (a) The slow writes: traced although the ratio is 0.
    let slow = find(&spans, |s| s.name == "write src").unwrap();
    assert_eq!(slow.service, "blockmirrord-test");
    assert_eq!(slow.kind, 2, "NBD writes are SERVER spans");
    for (k, v) in [
        ("disk.io.direction", "write"),
        ("blockmirror.volume", "src"),
        ("blockmirror.job.id", "j1"),
        ("blockmirror.copy_mode", "write_blocking"),
        ("blockmirror.write.op", "data"),
        ("blockmirror.write.bytes", "4096"),
        ("blockmirror.write.slow", "true"),
        ("blockmirror.sample.reason", "slow"),
        ("blockmirror.write.result", "ok"),
    ] {
        assert_eq!(slow.attr(k), Some(v), "{k} of {slow:#?}");
    }
    let secs = |k: &str| -> f64 {
        slow.attr(k)
            .unwrap_or_else(|| panic!("{k}"))
            .parse()
            .unwrap()
    };
    assert!(
        secs("blockmirror.write.target_latency_s") >= 0.1,
        "{slow:#?}"
    );
    assert!(secs("blockmirror.write.source_latency_s") >= 0.0);
    assert!(secs("blockmirror.write.range_lock_wait_s") >= 0.0);
    assert!(slow.attr("blockmirror.write.offset").is_some());
    assert!(
        slow.end_ns - slow.start_ns >= 100_000_000,
        "the span covers the write"
    );
    assert!(
        !spans
            .iter()
            .any(|s| s.attr("blockmirror.sample.reason") == Some("ratio")),
        "ratio 0 samples nothing"
    );

    // (b) The caller's traceparent is the parent of the RPC's span, and the
    // write it caused is a child of that span.
    let rpc = find(&spans, |s| s.name == "blockmirror.v1.DataService/Write").unwrap();
    assert_eq!(
        (rpc.trace_id.as_str(), rpc.parent_span_id.as_str()),
        (TRACE_WRITE, PARENT_WRITE)
    );
    assert_eq!(rpc.kind, 2);
    for (k, v) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "blockmirror.v1.DataService"),
        ("rpc.method", "Write"),
        ("rpc.grpc.status_code", "0"),
    ] {
        assert_eq!(rpc.attr(k), Some(v), "{k} of {rpc:#?}");
    }
    let write = find(&spans, |s| s.name == "write fast").unwrap();
    assert_eq!(write.trace_id, TRACE_WRITE);
    assert_eq!(write.parent_span_id, rpc.span_id);
    assert_eq!(write.attr("blockmirror.sample.reason"), Some("parent"));
    assert_eq!(write.attr("blockmirror.copy_mode"), Some("none"));

    // The job: its span is a child of StartMirror's, its states children of it.
    let start = find(&spans, |s| {
        s.name == "blockmirror.v1.JobService/StartMirror"
    })
    .unwrap();
    assert_eq!(
        (start.trace_id.as_str(), start.parent_span_id.as_str()),
        (TRACE_START, PARENT_START)
    );
    let job = find(&spans, |s| s.name == "mirror src").unwrap();
    assert_eq!(job.parent_span_id, start.span_id);
    assert_eq!(job.attr("blockmirror.job.id"), Some("j1"));
    assert_eq!(job.attr("blockmirror.target"), Some("volume:dst"));
    assert_eq!(job.attr("blockmirror.job.final_state"), Some("concluded"));
    let ready = find(&spans, |s| s.name == "job ready").unwrap();
    assert_eq!(ready.parent_span_id, job.span_id);
    assert_eq!(ready.attr("blockmirror.job.next_state"), Some("waiting"));
    assert_eq!(slow.trace_id.len(), 32);

    // mirrorctl's span is the parent of the GetJob it made.
    let cli = find(&spans, |s| s.name == "mirrorctl job").unwrap();
    assert_eq!(cli.service, "mirrorctl");
    assert_eq!(cli.kind, 3, "CLIENT span");
    let get = find(&spans, |s| s.name == "blockmirror.v1.JobService/GetJob").unwrap();
    assert_eq!(
        (get.trace_id.as_str(), get.parent_span_id.as_str()),
        (cli.trace_id.as_str(), cli.span_id.as_str())
    );

    // Prometheus: one guest-latency observation per write made.
    let m = parse_prometheus(&scrape(&metrics).await);
    assert_eq!(
        total(&m, "blockmirror_guest_write_duration_seconds_count"),
        f64::from(writes_made),
        "{m:#?}"
    );
    assert_eq!(
        total(&m, "blockmirror_target_write_duration_seconds_count"),
        3.0
    );
    let plus_inf: f64 = m["blockmirror_guest_write_duration_seconds_bucket"]
        .iter()
        .filter(|(l, _)| l.contains("le=\"+Inf\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(plus_inf, f64::from(writes_made));
    assert_eq!(
        total(&m, "blockmirror_guest_written_bytes_total"),
        f64::from(writes_made) * 4096.0
    );
    assert_eq!(
        m["blockmirror_jobs"]
            .iter()
            .find(|(l, _)| l.contains("state=\"concluded\""))
            .map(|(_, v)| *v),
        Some(1.0)
    );

    // (c) Copy operations: a full copy of "fast" onto an NBD target whose
    // every write nbdkit delays by 150 ms, so data copies take longer than
    // the 100 ms threshold and are traced (at ratio 0), as children of
    // their job.
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = Nbdkit::start_delayed(dir.path().join("slow.sock"), "4M", "150ms").await;
    let target = nbdkit.uri();
    let mut s = spec("fast", &target, CopyMode::Background);
    s.auto_dismiss = Some(false);
    c.start_mirror("j2", s).await;
    c.wait_for("j2", &[JobState::Ready], DEADLINE).await;
    // The job's span ends (and is exported) when the job concludes.
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "j2".into(),
            force: true,
        })
        .await
        .unwrap();
    c.wait_for("j2", &[JobState::Concluded], DEADLINE).await;
    let is_data_copy = |s: &ReceivedSpan| {
        s.name == "copy fast" && s.attr("blockmirror.copy.result") == Some("data")
    };
    let spans = spans_until(&rx, "a traced copy", |spans| {
        spans.iter().any(is_data_copy) && spans.iter().any(|s| s.name == "mirror fast")
    })
    .await;
    let job = find(&spans, |s| s.name == "mirror fast").unwrap();
    let copy = find(&spans, is_data_copy).unwrap();
    assert_eq!(
        (copy.trace_id.as_str(), copy.parent_span_id.as_str()),
        (job.trace_id.as_str(), job.span_id.as_str()),
        "a copy is a child of its job"
    );
    for (k, v) in [
        ("blockmirror.job.id", "j2"),
        ("blockmirror.volume", "fast"),
        ("blockmirror.copy.result", "data"),
        ("blockmirror.sample.reason", "slow"),
    ] {
        assert_eq!(copy.attr(k), Some(v), "{k} of {copy:#?}");
    }
    assert!(copy.end_ns - copy.start_ns >= 100_000_000, "{copy:#?}");
    assert!(copy.attr("blockmirror.copy.bytes").is_some());

    // OTLP metrics arrive too.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !rx
        .metric_names()
        .contains("blockmirror.guest_write.duration")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no OTLP metrics: {:?}",
            rx.metric_names()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn telemetry_is_off_without_otel_variables_and_bad_flags_exit_64() {
    let server = TestServer::start();
    assert!(!server.log().contains("telemetry on"), "{}", server.log());
    for (flag, value, says) in [
        ("--trace-write-sample-ratio", "2.0", "between 0 and 1"),
        ("--metrics-listen", "localhost:9464", "numeric IP"),
    ] {
        let out = Command::new(binary("blockmirrord"))
            .args([flag, value])
            .output()
            .expect("run blockmirrord");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}
