//! Bad input on every RPC field that can be bad: each is refused with the
//! exact status code and a message that says what is wrong, the server never
//! panics, and it keeps serving afterwards. Also blockmirrord's own flags.

use blockmirror_proto::v1::{self, CopyMode, ErrorPolicy, JobState, SyncMode};
use blockmirror_tests::{Clients, TestServer, spec};
use bytes::Bytes;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

const SIZE: u64 = 1 << 20;
const MAX_REQUEST: u64 = 32 << 20;

/// Asserts that `result` is an error with `code` whose message contains
/// every one of `needles`.
#[track_caller]
fn refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needles: &[&str],
) {
    let status = match result {
        Ok(r) => panic!("{what}: expected {code:?}, got OK: {:?}", r.into_inner()),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        code,
        "{what}: wrong code; message: {:?}",
        status.message()
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{what}: message {:?} must mention {needle:?}",
            status.message()
        );
    }
}

/// The server still answers, and did not panic on anything it was sent.
async fn still_serving(server: &TestServer, c: &mut Clients, probe: &str) {
    c.create_volume(probe, 64 << 10).await;
    c.write(probe, 512, vec![0x5a; 1024]).await;
    assert_eq!(c.read(probe, 512, 1024).await, vec![0x5a; 1024]);
    let log = server.log();
    assert!(!log.contains("panicked"), "blockmirrord panicked:\n{log}");
}

fn create_req(name: &str, size: u64, path: &str) -> v1::CreateVolumeRequest {
    v1::CreateVolumeRequest {
        name: name.into(),
        size_bytes: size,
        path: path.into(),
    }
}

fn attach_req(name: &str, path: &str, direct_io: bool) -> v1::AttachVolumeRequest {
    v1::AttachVolumeRequest {
        name: name.into(),
        path: path.into(),
        direct_io,
        ..Default::default()
    }
}

async fn volume_exists(c: &mut Clients, name: &str) -> bool {
    c.volumes
        .get_volume(v1::GetVolumeRequest { name: name.into() })
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_refuses_bad_names_sizes_and_paths() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    let long = "x".repeat(129);
    for (name, needle) in [
        ("", "volume name"),
        ("a/b", "a/b"),
        ("../escape", "../escape"),
        (".hidden", ".hidden"),
        ("-dash", "-dash"),
        ("sp ace", "sp ace"),
        (long.as_str(), "128"),
    ] {
        refused(
            &format!("create {name:?}"),
            c.volumes.create_volume(create_req(name, SIZE, "")).await,
            Code::InvalidArgument,
            &["volume name", needle],
        );
        assert!(
            !volume_exists(&mut c, name).await,
            "{name:?} was registered"
        );
    }
    // 128 characters is the longest name accepted.
    c.create_volume(&"y".repeat(128), 4096).await;

    refused(
        "size 0",
        c.volumes.create_volume(create_req("v0", 0, "")).await,
        Code::InvalidArgument,
        &["size 0", "multiple of 512"],
    );
    refused(
        "size 1000",
        c.volumes.create_volume(create_req("v1000", 1000, "")).await,
        Code::InvalidArgument,
        &["size 1000", "multiple of 512"],
    );
    assert!(!volume_exists(&mut c, "v0").await && !volume_exists(&mut c, "v1000").await);

    // Same name: the same size is idempotent, another size is refused.
    let first = c.create_volume("dup", SIZE).await;
    let again = c.create_volume("dup", SIZE).await;
    assert_eq!(first, again);
    refused(
        "duplicate with another size",
        c.volumes
            .create_volume(create_req("dup", 2 * SIZE, ""))
            .await,
        Code::AlreadyExists,
        &["\"dup\"", "already exists"],
    );
    let v = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "dup".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size_bytes, SIZE, "the refused call changed the volume");

    // A path in a directory that does not exist.
    let missing = server.path("no-such-dir").join("v.raw");
    let missing = missing.to_str().unwrap();
    refused(
        "path in a missing directory",
        c.volumes
            .create_volume(create_req("nodir", SIZE, missing))
            .await,
        Code::NotFound,
        &[missing],
    );
    assert!(!volume_exists(&mut c, "nodir").await);

    // An existing file: refused, and the file is left exactly as it was.
    let existing = server.path("existing.raw");
    std::fs::write(&existing, vec![0xa5; 8192]).unwrap();
    let existing_s = existing.to_str().unwrap();
    refused(
        "existing file",
        c.volumes
            .create_volume(create_req("exists", SIZE, existing_s))
            .await,
        Code::AlreadyExists,
        &[existing_s, "already exists"],
    );
    assert_eq!(std::fs::read(&existing).unwrap(), vec![0xa5; 8192]);
    assert!(!volume_exists(&mut c, "exists").await);

    still_serving(&server, &mut c, "probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_volume_refuses_bad_paths() {
    let server = TestServer::start();
    let mut c = server.clients().await;

    let missing = server.path("missing.raw");
    let missing = missing.to_str().unwrap();
    refused(
        "nonexistent path",
        c.volumes
            .attach_volume(attach_req("m", missing, false))
            .await,
        Code::NotFound,
        &[missing],
    );

    refused(
        "empty path",
        c.volumes.attach_volume(attach_req("e", "", false)).await,
        Code::InvalidArgument,
        &["path"],
    );

    let empty_file = server.path("zero.raw");
    std::fs::write(&empty_file, b"").unwrap();
    let empty_file = empty_file.to_str().unwrap();
    refused(
        "a 0-byte file",
        c.volumes
            .attach_volume(attach_req("z", empty_file, false))
            .await,
        Code::InvalidArgument,
        &[empty_file, "0 bytes"],
    );

    let good = server.path("good.raw");
    std::fs::write(&good, vec![0x3c; 64 << 10]).unwrap();
    let good = good.to_str().unwrap();
    let odd_size = server.path("odd.raw");
    std::fs::write(&odd_size, vec![0x3c; 4096 + 100]).unwrap();
    refused(
        "direct_io on a size off the block",
        c.volumes
            .attach_volume(attach_req("o", odd_size.to_str().unwrap(), true))
            .await,
        Code::InvalidArgument,
        &["odd.raw", "not a multiple"],
    );
    refused(
        "bad name",
        c.volumes
            .attach_volume(attach_req("a/b", good, false))
            .await,
        Code::InvalidArgument,
        &["volume name", "a/b"],
    );
    for name in ["m", "e", "z", "g"] {
        assert!(!volume_exists(&mut c, name).await, "{name} was registered");
    }

    // The same file attaches fine without O_DIRECT, and its bytes show.
    let v = c
        .volumes
        .attach_volume(attach_req("g", good, false))
        .await
        .expect("attach")
        .into_inner();
    assert_eq!(v.size_bytes, 64 << 10);
    assert_eq!(c.read("g", 0, 4096).await, vec![0x3c; 4096]);
    still_serving(&server, &mut c, "probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_volume_refuses_a_directory_or_char_device_as_invalid_argument() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    let dir = server.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let dir = dir.to_str().unwrap();
    // A bad argument, not an internal server error: for a volume and for
    // a mirror target file alike. Both are checked before failing.
    let mut wrong = Vec::new();
    match c.volumes.attach_volume(attach_req("d", dir, false)).await {
        Err(e) if e.code() == Code::InvalidArgument && e.message().contains(dir) => {}
        other => wrong.push(format!("AttachVolume(path = a directory): {other:?}")),
    }
    // A character device is neither a regular file nor a block device.
    match c
        .volumes
        .attach_volume(attach_req("n", "/dev/null", false))
        .await
    {
        Err(e) if e.code() == Code::InvalidArgument && e.message().contains("/dev/null") => {}
        other => wrong.push(format!("AttachVolume(path = /dev/null): {other:?}")),
    }
    c.create_volume("src", SIZE).await;
    match c
        .jobs
        .start_mirror(start_req(
            "j",
            spec("src", &format!("file:{dir}"), CopyMode::Background),
        ))
        .await
    {
        Err(e) if e.code() == Code::InvalidArgument && e.message().contains(dir) => {}
        other => wrong.push(format!("StartMirror(target = file:a directory): {other:?}")),
    }
    assert!(
        wrong.is_empty(),
        "expected INVALID_ARGUMENT naming the path:\n{}",
        wrong.join("\n")
    );
    assert!(!volume_exists(&mut c, "d").await && !volume_exists(&mut c, "n").await);
    still_serving(&server, &mut c, "probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_volume_is_not_found_everywhere() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    let name = "ghost";
    let needles = ["\"ghost\"", "does not exist"];
    refused(
        "get",
        c.volumes
            .get_volume(v1::GetVolumeRequest { name: name.into() })
            .await,
        Code::NotFound,
        &needles,
    );
    refused(
        "delete",
        c.volumes
            .delete_volume(v1::DeleteVolumeRequest { name: name.into() })
            .await,
        Code::NotFound,
        &needles,
    );
    refused(
        "set-limits",
        c.volumes
            .set_volume_limits(v1::SetVolumeLimitsRequest {
                name: name.into(),
                limits: Some(v1::IoLimits {
                    write_bytes_per_sec: 1 << 20,
                    write_iops: 0,
                }),
            })
            .await,
        Code::NotFound,
        &needles,
    );
    refused(
        "read",
        c.data
            .read(v1::ReadRequest {
                volume: name.into(),
                offset_bytes: 0,
                length_bytes: 512,
            })
            .await,
        Code::NotFound,
        &needles,
    );
    refused(
        "write",
        c.data
            .write(v1::WriteRequest {
                volume: name.into(),
                offset_bytes: 0,
                data: Bytes::from(vec![1u8; 512]),
                fua: false,
            })
            .await,
        Code::NotFound,
        &needles,
    );
    refused(
        "flush",
        c.data
            .flush(v1::FlushRequest {
                volume: name.into(),
            })
            .await,
        Code::NotFound,
        &needles,
    );
    refused(
        "discard",
        c.data
            .discard(v1::DiscardRequest {
                volume: name.into(),
                offset_bytes: 0,
                length_bytes: 512,
            })
            .await,
        Code::NotFound,
        &needles,
    );
    refused(
        "write-zeroes",
        c.data
            .write_zeroes(v1::WriteZeroesRequest {
                volume: name.into(),
                offset_bytes: 0,
                length_bytes: 512,
                no_hole: false,
            })
            .await,
        Code::NotFound,
        &needles,
    );
    still_serving(&server, &mut c, "probe").await;
}

fn unit<T>(
    r: Result<tonic::Response<T>, tonic::Status>,
) -> Result<tonic::Response<()>, tonic::Status> {
    r.map(|resp| resp.map(|_| ()))
}

/// One data RPC with a range, by name.
async fn ranged(
    c: &mut Clients,
    op: &str,
    volume: &str,
    offset: u64,
    len: u64,
) -> Result<tonic::Response<()>, tonic::Status> {
    let volume = volume.to_owned();
    match op {
        "read" => {
            let r = c
                .data
                .read(v1::ReadRequest {
                    volume,
                    offset_bytes: offset,
                    length_bytes: len,
                })
                .await;
            if let Ok(resp) = &r {
                assert_eq!(
                    resp.get_ref().data.len() as u64,
                    len,
                    "read returned the wrong length"
                );
            }
            unit(r)
        }
        "write" => unit(
            c.data
                .write(v1::WriteRequest {
                    volume,
                    offset_bytes: offset,
                    data: Bytes::from(vec![0xee; usize::try_from(len).unwrap()]),
                    fua: false,
                })
                .await,
        ),
        "discard" => unit(
            c.data
                .discard(v1::DiscardRequest {
                    volume,
                    offset_bytes: offset,
                    length_bytes: len,
                })
                .await,
        ),
        "write-zeroes" => unit(
            c.data
                .write_zeroes(v1::WriteZeroesRequest {
                    volume,
                    offset_bytes: offset,
                    length_bytes: len,
                    no_hole: false,
                })
                .await,
        ),
        _ => unreachable!("unknown op {op}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_rpcs_check_their_ranges() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("v", SIZE).await;
    let pattern = vec![0x11u8; usize::try_from(SIZE).unwrap()];
    c.write("v", 0, pattern.clone()).await;

    for op in ["read", "write", "discard", "write-zeroes"] {
        let past = ranged(&mut c, op, "v", SIZE + 512, 512).await;
        refused(
            &format!("{op} past the end"),
            past,
            Code::OutOfRange,
            &["past the end", "\"v\""],
        );
        let straddle = ranged(&mut c, op, "v", SIZE - 512, 1024).await;
        refused(
            &format!("{op} straddling the end"),
            straddle,
            Code::OutOfRange,
            &["past the end"],
        );
        if op != "write" {
            // offset + length overflows u64 (a write cannot carry such a length).
            let wrap = ranged(&mut c, op, "v", u64::MAX - 100, 512).await;
            refused(
                &format!("{op} offset+len overflow"),
                wrap,
                Code::OutOfRange,
                &["past the end"],
            );
            let huge_off = ranged(&mut c, op, "v", u64::MAX, 1).await;
            refused(
                &format!("{op} at offset u64::MAX"),
                huge_off,
                Code::OutOfRange,
                &["past the end"],
            );
            let huge_len = ranged(&mut c, op, "v", 0, u64::MAX).await;
            refused(
                &format!("{op} length u64::MAX"),
                huge_len,
                Code::InvalidArgument,
                &["larger than the maximum"],
            );
        }
        let too_big = ranged(&mut c, op, "v", 0, MAX_REQUEST + 1).await;
        refused(
            &format!("{op} larger than 32 MiB"),
            too_big,
            Code::InvalidArgument,
            &[&(MAX_REQUEST + 1).to_string(), "maximum"],
        );
        // Zero-length requests are fine, up to and including the end...
        for at in [0, SIZE / 2, SIZE] {
            ranged(&mut c, op, "v", at, 0)
                .await
                .unwrap_or_else(|e| panic!("zero-length {op} at {at}: {e:?}"));
        }
        // ...but not past it.
        refused(
            &format!("zero-length {op} past the end"),
            ranged(&mut c, op, "v", SIZE + 512, 0).await,
            Code::OutOfRange,
            &["past the end"],
        );
    }

    // Two bytes at size-1: refused as a whole, nothing written.
    refused(
        "write at size-1 with 2 bytes",
        c.data
            .write(v1::WriteRequest {
                volume: "v".into(),
                offset_bytes: SIZE - 1,
                data: Bytes::from_static(&[0xff, 0xff]),
                fua: true,
            })
            .await,
        Code::OutOfRange,
        &["past the end"],
    );
    // None of the refused requests touched the data.
    let mut back = Vec::new();
    for off in (0..SIZE).step_by(256 << 10) {
        back.extend(c.read("v", off, 256 << 10).await);
    }
    assert!(back == pattern, "a refused request changed the volume");
    // A write of exactly the last byte is fine.
    c.write("v", SIZE - 1, vec![0x77]).await;
    assert_eq!(c.read("v", SIZE - 2, 2).await, vec![0x11, 0x77]);
    still_serving(&server, &mut c, "probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writes_to_a_running_mirrors_target_are_refused() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", 4 * SIZE).await;
    c.create_volume("dst", 4 * SIZE).await;
    c.fill_random("src", 4 * SIZE, 9).await;
    // A slow target keeps the job running.
    c.limit("dst", 64 << 10).await;
    let mut s = spec("src", "volume:dst", CopyMode::Background);
    s.auto_dismiss = Some(false);
    // A small buffer, so a cancel does not wait for megabytes in flight.
    s.buf_size_bytes = 64 << 10;
    c.start_mirror("j", s).await;
    c.wait_for("j", &[JobState::Running], Duration::from_secs(10))
        .await;
    let before = c.read("dst", 3 * SIZE, 4096).await;
    let needles = ["\"dst\"", "target", "\"j\""];
    refused(
        "write to target",
        c.data
            .write(v1::WriteRequest {
                volume: "dst".into(),
                offset_bytes: 3 * SIZE,
                data: Bytes::from(vec![0xab; 4096]),
                fua: false,
            })
            .await,
        Code::FailedPrecondition,
        &needles,
    );
    refused(
        "discard on target",
        c.data
            .discard(v1::DiscardRequest {
                volume: "dst".into(),
                offset_bytes: 0,
                length_bytes: 4096,
            })
            .await,
        Code::FailedPrecondition,
        &needles,
    );
    refused(
        "write-zeroes on target",
        c.data
            .write_zeroes(v1::WriteZeroesRequest {
                volume: "dst".into(),
                offset_bytes: 0,
                length_bytes: 4096,
                no_hole: true,
            })
            .await,
        Code::FailedPrecondition,
        &needles,
    );
    assert_eq!(
        c.read("dst", 3 * SIZE, 4096).await,
        before,
        "a refused write reached the target"
    );
    // The source keeps taking guest writes.
    c.write("src", 0, vec![0x42; 4096]).await;
    // Once the job has ended, the target is an ordinary volume again.
    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "j".into(),
            force: true,
        })
        .await
        .unwrap();
    c.wait_for("j", &[JobState::Concluded], Duration::from_secs(10))
        .await;
    c.write("dst", 0, vec![0xcd; 512]).await;
    assert_eq!(c.read("dst", 0, 512).await, vec![0xcd; 512]);
    still_serving(&server, &mut c, "probe").await;
}

fn start_req(id: &str, s: v1::MirrorSpec) -> v1::StartMirrorRequest {
    v1::StartMirrorRequest {
        job_id: id.into(),
        spec: Some(s),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_mirror_refuses_bad_specs() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", SIZE).await;
    c.create_volume("dst", SIZE).await;
    c.create_volume("small", SIZE / 2).await;
    let good = || spec("src", "volume:dst", CopyMode::Background);

    refused(
        "empty job_id",
        c.jobs.start_mirror(start_req("", good())).await,
        Code::InvalidArgument,
        &["job_id"],
    );
    refused(
        "missing spec",
        c.jobs
            .start_mirror(v1::StartMirrorRequest {
                job_id: "j".into(),
                spec: None,
            })
            .await,
        Code::InvalidArgument,
        &["spec"],
    );
    for bad_id in ["a/b", "job 1", ".j", "-j", &"j".repeat(129)] {
        refused(
            &format!("job id {bad_id:?}"),
            c.jobs.start_mirror(start_req(bad_id, good())).await,
            Code::InvalidArgument,
            &["job id", bad_id],
        );
    }

    // Volumes.
    let mut s = good();
    s.source_volume = "nosuch".into();
    refused(
        "unknown source",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::NotFound,
        &["\"nosuch\""],
    );
    let mut s = good();
    s.source_volume = String::new();
    refused(
        "empty source",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["source volume"],
    );
    refused(
        "unknown target volume",
        c.jobs
            .start_mirror(start_req(
                "j",
                spec("src", "volume:nosuch", CopyMode::Background),
            ))
            .await,
        Code::NotFound,
        &["\"nosuch\""],
    );
    refused(
        "target is the source",
        c.jobs
            .start_mirror(start_req(
                "j",
                spec("src", "volume:src", CopyMode::Background),
            ))
            .await,
        Code::InvalidArgument,
        &["target", "source"],
    );
    refused(
        "target volume of another size",
        c.jobs
            .start_mirror(start_req(
                "j",
                spec("src", "volume:small", CopyMode::Background),
            ))
            .await,
        Code::InvalidArgument,
        &["\"small\"", &(SIZE / 2).to_string(), &SIZE.to_string()],
    );
    let other_size = server.path("other-size.raw");
    std::fs::write(&other_size, vec![0u8; 4096]).unwrap();
    let target = format!("file:{}", other_size.display());
    refused(
        "target file of another size",
        c.jobs
            .start_mirror(start_req("j", spec("src", &target, CopyMode::Background)))
            .await,
        Code::InvalidArgument,
        &[other_size.to_str().unwrap(), "4096", &SIZE.to_string()],
    );
    assert_eq!(
        std::fs::read(&other_size).unwrap(),
        vec![0u8; 4096],
        "a refused target file was changed"
    );

    let own = c
        .volumes
        .get_volume(v1::GetVolumeRequest { name: "src".into() })
        .await
        .unwrap()
        .into_inner()
        .path;
    refused(
        "target file is the source's own file",
        c.jobs
            .start_mirror(start_req(
                "j",
                spec("src", &format!("file:{own}"), CopyMode::Background),
            ))
            .await,
        Code::InvalidArgument,
        &["source"],
    );
    let nodir = server.path("no-such-dir").join("t.raw");
    let nodir_s = nodir.to_str().unwrap();
    refused(
        "target file in a missing directory",
        c.jobs
            .start_mirror(start_req(
                "j",
                spec("src", &format!("file:{nodir_s}"), CopyMode::Background),
            ))
            .await,
        Code::NotFound,
        &[nodir_s],
    );

    // Granularity and buffer size.
    for (g, why) in [
        (3000, "not a power of two, too small"),
        (1 << 10, "1 KiB"),
        (128 << 20, "128 MiB"),
        (96 << 10, "not a power of two"),
    ] {
        let mut s = good();
        s.granularity_bytes = g;
        refused(
            &format!("granularity {g} ({why})"),
            c.jobs.start_mirror(start_req("j", s)).await,
            Code::InvalidArgument,
            &["granularity", &g.to_string(), "power of two"],
        );
    }
    let mut s = good();
    s.granularity_bytes = 1 << 20;
    s.buf_size_bytes = 512 << 10;
    refused(
        "buf_size smaller than granularity",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["buf_size", "524288", "granularity"],
    );
    for b in [(1u64 << 30) + 1, 4 << 30, 4096] {
        let mut s = good();
        s.buf_size_bytes = b;
        refused(
            &format!("buf_size {b}"),
            c.jobs.start_mirror(start_req("j", s)).await,
            Code::InvalidArgument,
            &["buf_size", &b.to_string()],
        );
    }

    // The copier's shares (0 means the default).
    let mut s = good();
    s.copier_share_percent = 101;
    refused(
        "copier_share_percent 101",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["copier_share_percent", "101", "between 1 and 100"],
    );
    let mut s = good();
    s.copier_time_share_percent = 250;
    refused(
        "copier_time_share_percent 250",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["copier_time_share_percent", "250", "between 1 and 100"],
    );

    // Target forms.
    for (target, needles) in [
        ("", vec!["target", "volume:NAME"]),
        ("disk", vec!["\"disk\"", "volume:NAME, file:PATH"]),
        ("volume:", vec!["target volume name"]),
        ("file:", vec!["target file path is empty"]),
        ("nbds://x/y", vec!["nbds://x/y", "nbd://"]),
        ("nbd://x:0/y", vec!["nbd://x:0/y"]),
        ("nbd+unix:///e", vec!["socket"]),
    ] {
        refused(
            &format!("target {target:?}"),
            c.jobs
                .start_mirror(start_req("j", spec("src", target, CopyMode::Background)))
                .await,
            Code::InvalidArgument,
            &needles,
        );
    }

    // A well-formed NBD target nobody serves: unavailable, naming it.
    let dead = format!(
        "nbd+unix:///e?socket={}",
        server.path("nobody.sock").display()
    );
    refused(
        "unreachable NBD target",
        c.jobs
            .start_mirror(start_req("j", spec("src", &dead, CopyMode::Background)))
            .await,
        Code::Unavailable,
        &["nobody.sock"],
    );

    // Enum values outside the proto's sets, and unsupported ones.
    let mut s = good();
    s.copy_mode = 99;
    refused(
        "copy_mode 99",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["copy_mode", "99"],
    );
    let mut s = good();
    s.sync = 99;
    refused(
        "sync 99",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["sync", "99"],
    );
    let mut s = good();
    s.on_source_error = 99;
    refused(
        "on_source_error 99",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["on_source_error", "99"],
    );
    let mut s = good();
    s.on_target_error = 99;
    refused(
        "on_target_error 99",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["on_target_error", "99"],
    );
    let mut s = good();
    s.sync = SyncMode::Bitmap as i32;
    s.bitmap = "b0".into();
    refused(
        "sync bitmap",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["bitmap", "not supported yet"],
    );
    let mut s = good();
    s.bitmap = "b0".into();
    refused(
        "bitmap name without sync bitmap",
        c.jobs.start_mirror(start_req("j", s)).await,
        Code::InvalidArgument,
        &["bitmap"],
    );

    // Nothing was started and no volume is held by a refused job.
    let jobs = c
        .jobs
        .list_jobs(v1::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "refused starts left jobs: {jobs:?}");
    for name in ["src", "dst", "small"] {
        let v = c
            .volumes
            .get_volume(v1::GetVolumeRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        assert!(v.job_id.is_empty(), "{name} is still claimed: {v:?}");
    }
    // The good spec, with every policy spelled out, is accepted.
    let mut s = good();
    s.on_source_error = ErrorPolicy::Stop as i32;
    s.on_target_error = ErrorPolicy::Ignore as i32;
    s.sync = SyncMode::Full as i32;
    let j = c.start_mirror("j", s).await;
    assert_eq!(j.id, "j");
    c.wait_for("j", &[JobState::Ready], Duration::from_secs(20))
        .await;
    still_serving(&server, &mut c, "probe").await;
}

/// Every job RPC with `id`, as (name, result).
async fn every_job_rpc(
    c: &mut Clients,
    id: &str,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let job_id = id.to_owned();
    let r = || v1::JobRequest {
        job_id: job_id.clone(),
    };
    let unit = |x: Result<tonic::Response<v1::Job>, tonic::Status>| x.map(|_| ());
    vec![
        (
            "get",
            unit(
                c.jobs
                    .get_job(v1::GetJobRequest {
                        job_id: job_id.clone(),
                    })
                    .await,
            ),
        ),
        ("pause", unit(c.jobs.pause_job(r()).await)),
        ("resume", unit(c.jobs.resume_job(r()).await)),
        (
            "set-speed",
            unit(
                c.jobs
                    .set_job_speed(v1::SetJobSpeedRequest {
                        job_id: job_id.clone(),
                        speed_bytes_per_sec: 1 << 20,
                    })
                    .await,
            ),
        ),
        (
            "change",
            unit(
                c.jobs
                    .change_job(v1::ChangeJobRequest {
                        job_id: job_id.clone(),
                        copy_mode: CopyMode::WriteBlocking as i32,
                    })
                    .await,
            ),
        ),
        ("complete", unit(c.jobs.complete_job(r()).await)),
        (
            "cancel",
            unit(
                c.jobs
                    .cancel_job(v1::CancelJobRequest {
                        job_id: job_id.clone(),
                        force: true,
                    })
                    .await,
            ),
        ),
        ("finalize", unit(c.jobs.finalize_job(r()).await)),
        ("dismiss", unit(c.jobs.dismiss_job(r()).await)),
        (
            "wait",
            unit(
                c.jobs
                    .wait_job(v1::WaitJobRequest {
                        job_id: job_id.clone(),
                        until: vec![JobState::Ready as i32],
                        timeout_ms: 100,
                    })
                    .await,
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_rpcs_refuse_unknown_and_empty_job_ids() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    for (verb, result) in every_job_rpc(&mut c, "nosuch").await {
        let err = result.expect_err(verb);
        assert_eq!(err.code(), Code::NotFound, "{verb}: {err:?}");
        assert!(
            err.message().contains("\"nosuch\""),
            "{verb}: message {:?} must name the job",
            err.message()
        );
    }
    for (verb, result) in every_job_rpc(&mut c, "").await {
        let err = result.expect_err(verb);
        assert_eq!(err.code(), Code::InvalidArgument, "{verb}: {err:?}");
        assert!(
            err.message().contains("job_id"),
            "{verb}: message {:?} must name the field",
            err.message()
        );
    }
    // A good job still works afterwards.
    c.create_volume("a", SIZE).await;
    c.create_volume("b", SIZE).await;
    c.start_mirror("ok", spec("a", "volume:b", CopyMode::Background))
        .await;
    c.wait_for("ok", &[JobState::Ready], Duration::from_secs(20))
        .await;
    still_serving(&server, &mut c, "probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_job_and_wait_job_refuse_bad_arguments() {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("src", 4 * SIZE).await;
    c.create_volume("dst", 4 * SIZE).await;
    c.fill_random("src", 4 * SIZE, 5).await;
    c.limit("dst", 64 << 10).await;
    let mut s = spec("src", "volume:dst", CopyMode::Background);
    s.auto_dismiss = Some(false);
    s.buf_size_bytes = 64 << 10;
    c.start_mirror("p", s).await;
    c.wait_for("p", &[JobState::Running], Duration::from_secs(10))
        .await;
    c.jobs
        .pause_job(v1::JobRequest { job_id: "p".into() })
        .await
        .unwrap();
    c.wait_for("p", &[JobState::Paused], Duration::from_secs(10))
        .await;

    refused(
        "change to UNSPECIFIED",
        c.jobs
            .change_job(v1::ChangeJobRequest {
                job_id: "p".into(),
                copy_mode: CopyMode::Unspecified as i32,
            })
            .await,
        Code::InvalidArgument,
        &["copy_mode"],
    );
    refused(
        "change to 99",
        c.jobs
            .change_job(v1::ChangeJobRequest {
                job_id: "p".into(),
                copy_mode: 99,
            })
            .await,
        Code::InvalidArgument,
        &["copy_mode", "99"],
    );
    assert_eq!(
        c.job("p").await.copy_mode,
        CopyMode::Background as i32,
        "a refused change switched the mode"
    );

    let wait = |until: Vec<i32>, timeout_ms: u64| v1::WaitJobRequest {
        job_id: "p".into(),
        until,
        timeout_ms,
    };
    refused(
        "wait with empty until",
        c.jobs.wait_job(wait(vec![], 100)).await,
        Code::InvalidArgument,
        &["until"],
    );
    refused(
        "wait until 99",
        c.jobs.wait_job(wait(vec![99], 100)).await,
        Code::InvalidArgument,
        &["until", "99"],
    );
    refused(
        "wait until UNSPECIFIED",
        c.jobs
            .wait_job(wait(vec![JobState::Ready as i32, 0], 100))
            .await,
        Code::InvalidArgument,
        &["until", "0"],
    );

    // A timeout is not an error: the job comes back in its current state.
    let t0 = Instant::now();
    let j = c
        .jobs
        .wait_job(wait(vec![JobState::Ready as i32], 400))
        .await
        .expect("a wait that times out returns the job")
        .into_inner();
    let took = t0.elapsed();
    assert_eq!(j.id, "p");
    assert_eq!(j.state, JobState::Paused as i32, "{j:?}");
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(10),
        "returned after {took:?}, not at the 400 ms timeout"
    );
    // A state the job is in returns at once.
    let t0 = Instant::now();
    let j = c
        .jobs
        .wait_job(wait(
            vec![JobState::Ready as i32, JobState::Paused as i32],
            20_000,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state, JobState::Paused as i32);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    c.jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: "p".into(),
            force: true,
        })
        .await
        .unwrap();
    c.wait_for("p", &[JobState::Concluded], Duration::from_secs(10))
        .await;
    still_serving(&server, &mut c, "probe").await;
}

/// Runs blockmirrord with `args` (and `env`) in a scratch directory; kills
/// it if it does not exit within 10 s. Returns (exit code, stdout, stderr).
fn run_blockmirrord(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::Builder::new()
        .prefix("bm-flags")
        .tempdir()
        .unwrap();
    let mut cmd = Command::new(blockmirror_tests::binary("blockmirrord"));
    cmd.current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("BLOCKMIRROR_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1").envs(env.iter().copied());
    // A bad flag that is accepted by mistake must not start a server in
    // the working directory: give it a private state dir and socket.
    let state = dir.path().join("state");
    let mut child = cmd
        .arg("--state-dir")
        .arg(&state)
        .args(args)
        .spawn()
        .expect("spawn blockmirrord");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "blockmirrord {args:?} kept running; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn blockmirrord_refuses_bad_flags_with_exit_64() {
    for (args, env, needles) in [
        (
            vec!["--listen", "bogus"],
            vec![],
            vec!["--listen", "bogus", "unix:PATH or tcp:HOST:PORT"],
        ),
        (
            vec!["--listen", "tcp:nohost"],
            vec![],
            vec!["--listen", "tcp:nohost", "tcp:HOST:PORT"],
        ),
        (
            vec!["--listen", "unix:"],
            vec![],
            vec!["--listen", "socket path"],
        ),
        (
            vec!["--event-history", "0"],
            vec![],
            vec!["--event-history", "0"],
        ),
        (
            vec!["--heartbeat-secs", "0"],
            vec![],
            vec!["--heartbeat-secs", "0"],
        ),
        (vec!["--bogus"], vec![], vec!["--bogus"]),
        (
            vec![],
            vec![("BLOCKMIRROR_EVENT_HISTORY", "0")],
            vec!["event-history", "0"],
        ),
        (
            vec![],
            vec![("BLOCKMIRROR_LISTEN", "bogus")],
            vec!["bogus", "unix:PATH or tcp:HOST:PORT"],
        ),
    ] {
        let (code, _, stderr) = run_blockmirrord(&args, &env);
        let what = format!("blockmirrord {args:?} {env:?}");
        assert_eq!(code, Some(64), "{what}: stderr:\n{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            lines.first().is_some_and(|l| l.starts_with("error:")),
            "{what}: stderr must start with `error:`:\n{stderr}"
        );
        assert!(
            lines.len() <= 4,
            "{what}: a short message, not {} lines:\n{stderr}",
            lines.len()
        );
        for needle in needles {
            assert!(
                lines[0].contains(needle),
                "{what}: the error line must mention {needle:?}:\n{stderr}"
            );
        }
        assert!(!stderr.contains("panicked"), "{what}:\n{stderr}");
    }
}

#[test]
fn blockmirrord_help_exits_0_and_names_the_env_twins() {
    let (code, stdout, stderr) = run_blockmirrord(&["--help"], &[]);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    for needle in [
        "BLOCKMIRROR_STATE_DIR",
        "BLOCKMIRROR_LISTEN",
        "BLOCKMIRROR_EVENT_HISTORY",
        "--listen",
    ] {
        assert!(
            stdout.contains(needle),
            "--help must mention {needle}:\n{stdout}"
        );
    }
}
