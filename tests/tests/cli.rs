//! `mirrorctl` against a real blockmirrord: the README walkthrough command by
//! command, exit statuses and one-line errors, `-o json` shapes, `watch`,
//! and the wait / cancel / dismiss flows.

use blockmirror_proto::v1::{self, CopyMode, JobState};
use blockmirror_tests::{TestServer, assert_same, binary, spec};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The lowercase state names of the CLI contract.
const STATES: [&str; 10] = [
    "created",
    "running",
    "paused",
    "ready",
    "standby",
    "waiting",
    "pending",
    "aborting",
    "concluded",
    "null",
];

/// A finished `mirrorctl` run.
#[derive(Debug)]
struct Run {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(args: &[&str], out: Output) -> Self {
        Self {
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Exit status 0; returns stdout.
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "mirrorctl {:?} failed\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// A runtime failure: exit status 1, nothing on stdout, exactly one line
    /// on stderr starting with `error:`, containing every one of `needles`.
    #[track_caller]
    fn fails(&self, needles: &[&str]) -> &str {
        assert_eq!(
            self.code,
            Some(1),
            "mirrorctl {:?}: expected exit status 1\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        let line = self.one_error_line();
        for needle in needles {
            assert!(
                line.contains(needle),
                "mirrorctl {:?}: error {line:?} must mention {needle:?}",
                self.args
            );
        }
        line
    }

    #[track_caller]
    fn one_error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: "),
            "mirrorctl {:?}: stderr must be exactly one `error: ...` line, got:\n{}",
            self.args,
            self.stderr
        );
        lines[0]
    }

    /// A usage error: exit status 2 and a message on stderr that starts with
    /// `error:` and mentions every one of `needles`.
    #[track_caller]
    fn usage_error(&self, needles: &[&str]) {
        assert_eq!(
            self.code,
            Some(2),
            "mirrorctl {:?}: expected exit status 2\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        assert!(
            self.stdout.is_empty(),
            "{:?}: stdout {:?}",
            self.args,
            self.stdout
        );
        let first = self.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error:"),
            "{:?}: stderr must start with `error:`:\n{}",
            self.args,
            self.stderr
        );
        for needle in needles {
            assert!(
                first.contains(needle),
                "{:?}: error {first:?} must mention {needle:?}",
                self.args
            );
        }
    }

    /// Stdout parsed as one JSON value (exit status 0 required).
    #[track_caller]
    fn json(&self) -> Value {
        let out = self.ok();
        assert_eq!(
            out.lines().count(),
            1,
            "{:?}: -o json prints one line:\n{out}",
            self.args
        );
        serde_json::from_str(out)
            .unwrap_or_else(|e| panic!("{:?}: stdout is not JSON ({e}):\n{out}", self.args))
    }

    /// `key: value` lines of the table output (exit status 0 required).
    #[track_caller]
    fn fields(&self) -> HashMap<String, String> {
        self.ok()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    }
}

/// Runs `mirrorctl --socket SOCKET ARGS` in the server's scratch directory
/// (where the walkthrough's `data.bin` lives).
fn ctl(server: &TestServer, args: &[&str]) -> Run {
    let out = command(server.dir.path())
        .arg("--socket")
        .arg(&server.socket)
        .args(args)
        .output()
        .expect("run mirrorctl");
    Run::from(args, out)
}

/// `mirrorctl -o json ARGS`, parsed.
#[track_caller]
fn json(server: &TestServer, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    ctl(server, &all).json()
}

/// A mirrorctl command with no BLOCKMIRROR_* environment of the caller.
fn command(cwd: &Path) -> Command {
    let mut cmd = Command::new(binary("mirrorctl"));
    cmd.current_dir(cwd)
        .stdin(Stdio::null())
        .env("NO_COLOR", "1");
    for (k, _) in std::env::vars() {
        if k.starts_with("BLOCKMIRROR_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Checks the documented fields of a job object.
#[track_caller]
fn check_job_json(v: &Value, id: &str) {
    assert!(v.is_object(), "a job is a JSON object: {v}");
    assert_eq!(v["id"], id, "{v}");
    let state = v["state"].as_str().unwrap_or_else(|| panic!("state: {v}"));
    assert!(
        STATES.contains(&state),
        "state {state:?} is not a lowercase QEMU name"
    );
    let mode = v["copy_mode"]
        .as_str()
        .unwrap_or_else(|| panic!("copy_mode: {v}"));
    assert!(
        ["background", "write-blocking"].contains(&mode),
        "copy_mode {mode:?}"
    );
    assert!(v["actively_synced"].is_boolean(), "actively_synced: {v}");
    for n in ["current_progress", "total_progress", "dirty_bytes"] {
        assert!(v[n].is_u64(), "{n} must be a byte count: {v}");
    }
    assert!(
        v["error"].is_null() || v["error"].is_string(),
        "error must be null or a string: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough() {
    let server = TestServer::start();
    let volumes = server.dir.path().join("state").join("volumes");

    // mirrorctl volume create disk --size 64M
    let f = ctl(&server, &["volume", "create", "disk", "--size", "64M"]).fields();
    assert_eq!(f["name"], "disk");
    assert!(f["size"].contains("67108864"), "{f:?}");
    assert!(f["path"].ends_with("/disk.raw"), "{f:?}");
    // mirrorctl volume create copy --size 64M
    let f = ctl(&server, &["volume", "create", "copy", "--size", "64M"]).fields();
    assert_eq!(f["name"], "copy");
    // mirrorctl volume set-limits copy --write-bps 8M
    let f = ctl(
        &server,
        &["volume", "set-limits", "copy", "--write-bps", "8M"],
    )
    .fields();
    assert_eq!(f["write_bps"], "8 MiB/s", "{f:?}");

    // head -c 1M /dev/urandom > data.bin
    let mut data = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(42).fill(&mut data[..]);
    std::fs::write(server.path("data.bin"), &data).unwrap();
    // mirrorctl data write disk --offset 0 --file data.bin
    let out = ctl(
        &server,
        &[
            "data", "write", "disk", "--offset", "0", "--file", "data.bin",
        ],
    );
    assert!(out.ok().contains("1048576"), "{out:?}");

    // mirrorctl mirror start disk --target volume:copy --job m1 --mode write-blocking --wait ready
    let f = ctl(
        &server,
        &[
            "mirror",
            "start",
            "disk",
            "--target",
            "volume:copy",
            "--job",
            "m1",
            "--mode",
            "write-blocking",
            "--wait",
            "ready",
        ],
    )
    .fields();
    assert_eq!(f["id"], "m1");
    assert_eq!(f["state"], "ready", "{f:?}");

    // mirrorctl job show m1        # state: ready, actively_synced: true
    let f = ctl(&server, &["job", "show", "m1"]).fields();
    assert_eq!(f["state"], "ready", "{f:?}");
    assert_eq!(f["actively_synced"], "true", "{f:?}");
    assert_eq!(f["copy_mode"], "write-blocking", "{f:?}");
    // The same as JSON, with the documented fields.
    let j = json(&server, &["job", "show", "m1"]);
    check_job_json(&j, "m1");
    assert_eq!(j["state"], "ready");
    assert_eq!(j["copy_mode"], "write-blocking");
    assert_eq!(j["actively_synced"], true);
    assert_eq!(j["dirty_bytes"], 0);
    assert_eq!(j["current_progress"], j["total_progress"], "{j}");
    assert!(j["error"].is_null(), "{j}");

    // mirrorctl job complete m1 --wait
    ctl(&server, &["job", "complete", "m1", "--wait"]).ok();

    // mirrorctl volume show disk    # path: .../copy.raw
    let f = ctl(&server, &["volume", "show", "disk"]).fields();
    assert!(f["path"].ends_with("/copy.raw"), "{f:?}");
    let v = json(&server, &["volume", "show", "disk"]);
    assert!(
        v["path"].as_str().is_some_and(|p| p.ends_with("/copy.raw")),
        "{v}"
    );
    assert!(v["job_id"].is_null(), "{v}");

    // cmp blockmirror-state/volumes/disk.raw blockmirror-state/volumes/copy.raw
    let old = std::fs::read(volumes.join("disk.raw")).unwrap();
    let new = std::fs::read(volumes.join("copy.raw")).unwrap();
    assert_eq!(old.len(), 64 << 20);
    assert_same("disk.raw vs copy.raw", &old, &new);
    assert_same("copy.raw vs data.bin", &new[..data.len()], &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_the_right_exit_status() {
    let server = TestServer::start();
    ctl(&server, &["volume", "create", "disk", "--size", "1M"]).ok();
    ctl(&server, &["volume", "create", "copy", "--size", "1M"]).ok();

    // Server errors: exit 1, one line.
    ctl(&server, &["volume", "show", "nope"]).fails(&["not found", "\"nope\""]);
    ctl(&server, &["volume", "delete", "nope"]).fails(&["not found", "\"nope\""]);
    ctl(&server, &["job", "show", "nope"]).fails(&["not found", "\"nope\""]);
    ctl(&server, &["job", "cancel", "nope"]).fails(&["not found", "\"nope\""]);
    ctl(
        &server,
        &["job", "wait", "nope", "--until", "ready", "--timeout", "5"],
    )
    .fails(&["not found", "\"nope\""]);
    ctl(
        &server,
        &[
            "data",
            "write",
            "nope",
            "--offset",
            "0",
            "--pattern",
            "1",
            "--length",
            "512",
        ],
    )
    .fails(&["not found", "\"nope\""]);
    ctl(
        &server,
        &[
            "mirror",
            "start",
            "disk",
            "--target",
            "nbds://x/y",
            "--job",
            "n",
        ],
    )
    .fails(&["invalid argument", "nbds://x/y"]);
    ctl(
        &server,
        &[
            "mirror",
            "start",
            "disk",
            "--target",
            "volume:disk",
            "--job",
            "n",
        ],
    )
    .fails(&["invalid argument"]);
    ctl(&server, &["volume", "create", "disk", "--size", "2M"])
        .fails(&["already exists", "\"disk\""]);

    // Usage errors: exit 2 with a message.
    ctl(&server, &["volume", "create", "x", "--size", "12Q"]).usage_error(&["12Q"]);
    ctl(&server, &["volume", "create", "x", "--size", "-5"]).usage_error(&["-5"]);
    ctl(
        &server,
        &[
            "mirror",
            "start",
            "disk",
            "--target",
            "volume:copy",
            "--mode",
            "sideways",
        ],
    )
    .usage_error(&["sideways"]);
    ctl(&server, &["job", "wait", "X", "--until", "bogus"]).usage_error(&["bogus"]);
    // None of that created anything.
    ctl(&server, &["volume", "show", "x"]).fails(&["not found"]);
    assert_eq!(json(&server, &["job", "list"]), Value::Array(vec![]));

    // No server on the socket: exit 1, naming the socket.
    let missing = server.path("nobody-here.sock");
    let stale = server.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for sock in [&missing, &stale] {
        let args = ["volume", "list"];
        let out = command(server.dir.path())
            .arg("--socket")
            .arg(sock)
            .args(args)
            .output()
            .unwrap();
        let run = Run::from(&args, out);
        run.fails(&[sock.to_str().unwrap(), "blockmirrord"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_json_arrays() {
    let server = TestServer::start();
    assert_eq!(json(&server, &["volume", "list"]), Value::Array(vec![]));
    assert_eq!(json(&server, &["job", "list"]), Value::Array(vec![]));
    ctl(&server, &["volume", "create", "b-vol", "--size", "64K"]).ok();
    ctl(&server, &["volume", "create", "a-vol", "--size", "1M"]).ok();
    let list = json(&server, &["volume", "list"]);
    let items = list
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"));
    let names: Vec<&str> = items.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["a-vol", "b-vol"], "{list}");
    assert_eq!(items[0]["size_bytes"], 1 << 20);
    assert_eq!(items[1]["size_bytes"], 64 << 10);
    for v in items {
        assert!(v["path"].is_string() && v["job_id"].is_null(), "{v}");
    }
    // A job list with a job in it.
    let mut c = server.clients().await;
    c.create_volume("a-dst", 1 << 20).await;
    c.start_mirror("lj", spec("a-vol", "volume:a-dst", CopyMode::Background))
        .await;
    let jobs = json(&server, &["job", "list"]);
    let jobs = jobs
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {jobs}"));
    assert_eq!(jobs.len(), 1);
    check_job_json(&jobs[0], "lj");
}

/// `volume attach --direct` opens the file with O_DIRECT, shows it, and
/// refuses a file whose size does not fit the device's block with a
/// message that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_attach_direct() {
    let server = TestServer::start();
    let good = server.path("direct.raw");
    std::fs::File::create(&good)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let good = good.to_str().unwrap();
    ctl(
        &server,
        &["volume", "attach", "d", "--path", good, "--direct"],
    )
    .ok();
    let v = json(&server, &["volume", "show", "d"]);
    assert_eq!(v["direct_io"], true, "{v}");
    assert!(v["block_size_bytes"].as_u64().unwrap() >= 512, "{v}");
    let table = ctl(&server, &["volume", "list"]).ok().to_owned();
    let row = table.lines().find(|l| l.starts_with("d ")).unwrap();
    assert!(row.contains(" yes "), "the DIRECT column: {table}");
    // Attaching again the same way is a no-op; the other way is refused.
    ctl(
        &server,
        &["volume", "attach", "d", "--path", good, "--direct"],
    )
    .ok();
    ctl(&server, &["volume", "attach", "d", "--path", good])
        .fails(&["already exists", "with direct I/O"]);

    let odd = server.path("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    ctl(
        &server,
        &[
            "volume",
            "attach",
            "o",
            "--path",
            odd.to_str().unwrap(),
            "--direct",
        ],
    )
    .fails(&["odd.raw", "not a multiple"]);
}

/// Kills the child on drop (a failed assertion must not leave it running).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next stdout line of a child, or panics at `deadline`.
#[track_caller]
fn next_line(rx: &mpsc::Receiver<String>, deadline: Instant, seen: &[String]) -> String {
    let left = deadline.saturating_duration_since(Instant::now());
    rx.recv_timeout(left)
        .unwrap_or_else(|e| panic!("no line from watch ({e:?}); so far:\n{}", seen.join("\n")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_one_json_object_per_line() {
    let server = TestServer::start_with(&["--heartbeat-secs", "1"]);
    let mut child = command(server.dir.path())
        .arg("--socket")
        .arg(&server.socket)
        .args(["-o", "json", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mirrorctl watch");
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines: Vec<String> = Vec::new();
    let parse = |line: &str| -> Value {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("watch line is not JSON ({e}): {line}"));
        assert!(
            v.is_object() && v["type"].is_string(),
            "watch line must be an object with a type: {line}"
        );
        v
    };
    // A heartbeat shows the stream is open before the job starts.
    loop {
        let line = next_line(&rx, deadline, &lines);
        let v = parse(&line);
        lines.push(line);
        if v["type"] == "HEARTBEAT" {
            assert!(v["latest_sequence"].is_u64(), "{v}");
            break;
        }
    }

    let mut c = server.clients().await;
    c.create_volume("w-src", 4 << 20).await;
    c.create_volume("w-dst", 4 << 20).await;
    c.fill_random("w-src", 4 << 20, 11).await;
    c.start_mirror("wj", spec("w-src", "volume:w-dst", CopyMode::Background))
        .await;

    let mut events: Vec<Value> = Vec::new();
    loop {
        let line = next_line(&rx, deadline, &lines);
        let v = parse(&line);
        lines.push(line);
        if v["job_id"] == "wj" {
            events.push(v.clone());
        }
        if v["type"] == "BLOCK_JOB_READY" && v["job_id"] == "wj" {
            break;
        }
    }
    let ready = events.last().unwrap();
    assert!(
        ready["sequence"].is_u64() && ready["time"].is_string(),
        "{ready}"
    );
    assert_eq!(
        ready["current_progress"], ready["total_progress"],
        "{ready}"
    );
    assert_eq!(ready["dirty_bytes"], 0, "{ready}");
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "JOB_STATUS_CHANGE")
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert!(
        states.ends_with(&["running", "ready"]),
        "status changes before READY: {states:?}"
    );
    let seqs: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] != "PROGRESS")
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequences must increase: {seqs:?}"
    );
    // Still watching: it runs until interrupted, and Ctrl-C ends it cleanly.
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "watch exited on its own"
    );
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let stop_by = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < stop_by, "watch ignored SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "watch after Ctrl-C: {status}");
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "wj".into(),
            force: true,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_cancel_and_dismiss() {
    let server = TestServer::start();
    for args in [
        &["volume", "create", "src", "--size", "8M"][..],
        &["volume", "create", "dst", "--size", "8M"],
        &[
            "data",
            "write",
            "src",
            "--offset",
            "1M",
            "--pattern",
            "0xab",
            "--length",
            "1M",
        ],
    ] {
        ctl(&server, args).ok();
    }
    let j = json(
        &server,
        &[
            "mirror",
            "start",
            "src",
            "--target",
            "volume:dst",
            "--job",
            "w1",
            "--no-auto-dismiss",
        ],
    );
    check_job_json(&j, "w1");
    assert_eq!(j["spec"]["auto_dismiss"], false, "{j}");

    // job wait ID --until ready --timeout 30
    let f = ctl(
        &server,
        &["job", "wait", "w1", "--until", "ready", "--timeout", "30"],
    )
    .fields();
    assert_eq!(f["state"], "ready", "{f:?}");

    // Cancel in ready: no pivot, the target stays a consistent copy.
    let j = json(&server, &["job", "cancel", "w1"]);
    check_job_json(&j, "w1");
    ctl(
        &server,
        &[
            "job",
            "wait",
            "w1",
            "--until",
            "concluded",
            "--timeout",
            "30",
        ],
    )
    .ok();
    let j = json(&server, &["job", "show", "w1"]);
    check_job_json(&j, "w1");
    assert_eq!(j["state"], "concluded", "{j}");
    assert_eq!(j["pivoted"], false, "{j}");
    assert!(j["error"].is_null(), "{j}");
    let v = json(&server, &["volume", "show", "src"]);
    assert!(v["path"].as_str().unwrap().ends_with("/src.raw"), "{v}");
    assert!(v["job_id"].is_null(), "{v}");
    ctl(
        &server,
        &[
            "data", "read", "dst", "--offset", "1M", "--length", "1M", "--out", "dst.bin",
        ],
    )
    .ok();
    assert_eq!(
        std::fs::read(server.path("dst.bin")).unwrap(),
        vec![0xab; 1 << 20]
    );

    // Dismiss: the job is gone.
    let j = json(&server, &["job", "dismiss", "w1"]);
    assert_eq!(j["state"], "null", "{j}");
    ctl(&server, &["job", "show", "w1"]).fails(&["not found", "\"w1\""]);
    ctl(&server, &["job", "dismiss", "w1"]).fails(&["not found"]);
    assert_eq!(json(&server, &["job", "list"]), Value::Array(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_fails_and_force_cancel_ends_a_paused_job() {
    let server = TestServer::start();
    for args in [
        &["volume", "create", "p-src", "--size", "4M"][..],
        &["volume", "create", "p-dst", "--size", "4M"],
        &["volume", "set-limits", "p-dst", "--write-bps", "64K"],
        &[
            "data",
            "write",
            "p-src",
            "--offset",
            "0",
            "--pattern",
            "0xcd",
            "--length",
            "4M",
        ],
        &[
            "mirror",
            "start",
            "p-src",
            "--target",
            "volume:p-dst",
            "--job",
            "p1",
            "--no-auto-dismiss",
            "--buf-size",
            "64K",
        ],
    ] {
        ctl(&server, args).ok();
    }
    let j = json(&server, &["job", "pause", "p1"]);
    check_job_json(&j, "p1");
    let f = ctl(
        &server,
        &["job", "wait", "p1", "--until", "paused", "--timeout", "10"],
    )
    .fields();
    assert_eq!(f["state"], "paused", "{f:?}");

    // A wait that times out fails, saying so and where the job is.
    let t0 = Instant::now();
    ctl(
        &server,
        &["job", "wait", "p1", "--until", "ready", "--timeout", "0.5"],
    )
    .fails(&["timed out", "p1", "paused"]);
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "gave up after {:?}",
        t0.elapsed()
    );

    ctl(&server, &["job", "cancel", "p1", "--force"]).ok();
    ctl(
        &server,
        &[
            "job",
            "wait",
            "p1",
            "--until",
            "concluded",
            "--timeout",
            "20",
        ],
    )
    .ok();
    let j = json(&server, &["job", "show", "p1"]);
    assert_eq!(j["state"], "concluded", "{j}");
    assert_eq!(j["pivoted"], false, "{j}");
    // A job that ended cannot be waited into another state.
    ctl(
        &server,
        &["job", "wait", "p1", "--until", "ready", "--timeout", "5"],
    )
    .fails(&["p1"]);
    ctl(&server, &["job", "dismiss", "p1"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_complete_wait_reports_the_pivot() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    let mut wrong = Vec::new();
    for i in 0..3 {
        let (src, dst, id) = (format!("c{i}-src"), format!("c{i}-dst"), format!("c{i}"));
        c.create_volume(&src, 4 << 20).await;
        c.create_volume(&dst, 4 << 20).await;
        c.write(&src, 0, vec![0x5c; 1 << 20]).await;
        c.start_mirror(
            &id,
            spec(&src, &format!("volume:{dst}"), CopyMode::Background),
        )
        .await;
        c.wait_for(&id, &[JobState::Ready], Duration::from_secs(20))
            .await;
        // Auto-dismissed (the default): the job is gone once it has pivoted.
        let j = json(&server, &["job", "complete", &id, "--wait"]);
        check_job_json(&j, &id);
        let path = c
            .volumes
            .get_volume(v1::GetVolumeRequest { name: src.clone() })
            .await
            .unwrap()
            .into_inner()
            .path;
        assert!(path.ends_with(&format!("/{dst}.raw")), "no pivot: {path}");
        if j["pivoted"] != true {
            wrong.push(format!(
                "job {id} pivoted, but `job complete --wait` printed {j}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
