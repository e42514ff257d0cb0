//! The NBD server against real clients: qemu-io, qemu-img, nbdinfo, fio.

use blockmirror_proto::v1;
use blockmirror_tests::{TestServer, assert_same, tool, tool_ok};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 64 << 20;

async fn exported(server: &TestServer, name: &str, read_only: bool) -> blockmirror_tests::Clients {
    let mut c = server.clients().await;
    c.create_volume(name, SIZE).await;
    c.export(name, read_only).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_patterns() {
    let server = TestServer::start();
    let mut c = exported(&server, "disk", false).await;
    let uri = server.nbd_uri("disk");
    let out = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0x11 4097 1k",
            "-c",
            "read -P 0x11 4097 1k",
            "-c",
            "read -P 0xab 0 4097",
            "-c",
            "write -P 0x22 -f 8M 64k",
            "-c",
            "flush",
            "-c",
            "write -z 2M 64k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "write -P 0x33 3M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "aio_write -P 0x44 10M 4k",
            "-c",
            "aio_write -P 0x55 11M 4k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x44 10M 4k",
            "-c",
            "read -P 0x55 11M 4k",
            // The largest request NBD allows, at an odd offset: read and
            // applied in 1 MiB slices, with FUA.
            "-c",
            "write -P 0x66 -f 20971521 32M",
            "-c",
            "read -P 0x66 20971521 32M",
            "-c",
            "read -P 0 20971520 1",
            &uri,
        ],
    );
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");
    // The same bytes through gRPC: both front ends share the engine.
    let d = c.read("disk", 4097, 1024).await;
    assert!(d.iter().all(|&b| b == 0x11));
    let d = c.read("disk", 8 << 20, 65536).await;
    assert!(d.iter().all(|&b| b == 0x22));
    // A wrong pattern is caught (the check above can fail).
    let (ok, _) = tool("qemu-io", &["-f", "raw", "-c", "read -P 0x99 0 4k", &uri]);
    assert!(!ok, "qemu-io must fail on a pattern mismatch");
    // Past the end: qemu reports an error, the server stays up.
    let (ok, out) = tool(
        "qemu-io",
        &["-f", "raw", "-c", &format!("read {} 4k", SIZE), &uri],
    );
    assert!(
        !ok || out.contains("error") || out.contains("Input/output") || out.contains("Invalid"),
        "{out}"
    );
    tool_ok("qemu-io", &["-f", "raw", "-c", "read -P 0xab 0 4k", &uri]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_in_and_out_and_compare() {
    let server = TestServer::start();
    let mut c = exported(&server, "disk", false).await;
    let uri = server.nbd_uri("disk");
    let src = server.path("src.raw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut data = vec![0u8; SIZE as usize];
    // Half data, half zeroes: convert must handle both.
    rng.fill(&mut data[..(SIZE / 2) as usize]);
    std::fs::write(&src, &data).unwrap();
    let src_s = src.to_str().unwrap();
    tool_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    let out = tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert!(out.contains("identical"), "{out}");
    assert_same(
        "volume vs source file",
        &c.read("disk", 0, SIZE).await,
        &data,
    );
    let back = server.path("back.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().unwrap(),
        ],
    );
    assert_same("converted back", &std::fs::read(&back).unwrap(), &data);
    // compare notices a difference.
    c.write("disk", 12345, vec![7u8; 10]).await;
    let (same, out) = tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert!(!same, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_sizes_and_maps() {
    let server = TestServer::start();
    let mut c = exported(&server, "disk", false).await;
    c.create_volume("other", 1 << 20).await;
    c.volumes
        .add_export(v1::AddExportRequest {
            volume: "other".into(),
            name: "second".into(),
            read_only: true,
        })
        .await
        .unwrap();
    let list = tool_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", server.nbd_socket.display()),
        ],
    );
    assert!(list.contains("disk") && list.contains("second"), "{list}");
    let size = tool_ok("nbdinfo", &["--size", &server.nbd_uri("disk")]);
    assert_eq!(size.trim(), SIZE.to_string());
    let info = tool_ok("nbdinfo", &[&server.nbd_uri("second")]);
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    c.write("disk", 4 << 20, vec![1u8; 1 << 20]).await;
    let map = tool_ok("nbdinfo", &["--map", &server.nbd_uri("disk")]);
    // Expect: hole [0,4M), data [4M,5M), hole [5M,64M).
    let lines: Vec<&str> = map.lines().collect();
    assert!(lines.len() >= 3, "{map}");
    assert!(
        lines
            .iter()
            .any(
                |l| l.split_whitespace().take(2).collect::<Vec<_>>() == ["4194304", "1048576"]
                    && l.contains("data")
            ),
        "{map}"
    );
    assert!(lines[0].contains("hole"), "{map}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_over_several_connections() {
    let server = TestServer::start();
    let _c = exported(&server, "disk", false).await;
    let uri = format!("--uri={}", server.nbd_uri("disk"));
    for (rw, bs, depth) in [("randwrite", "4k", "32"), ("randrw", "64k", "8")] {
        let out = tool_ok(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &uri,
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--size=16m",
                &format!("--iodepth={depth}"),
                "--numjobs=2",
                "--offset_increment=24m",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--do_verify=1",
                "--output-format=terse",
            ],
        );
        assert!(!out.contains("verify: bad"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_exports_and_removed_exports() {
    let server = TestServer::start();
    let mut c = exported(&server, "disk", true).await;
    let uri = server.nbd_uri("disk");
    tool_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 64k", &uri],
    );
    let (ok, out) = tool("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]);
    assert!(
        !ok || out.contains("read-only")
            || out.contains("Operation not permitted")
            || out.contains("denied"),
        "{out}"
    );
    assert!(
        c.read("disk", 0, 4096).await.iter().all(|&b| b == 0),
        "a read-only export was written"
    );
    c.volumes
        .remove_export(v1::RemoveExportRequest {
            name: "disk".into(),
        })
        .await
        .unwrap();
    let (ok, out) = tool("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", &uri]);
    assert!(!ok, "removed export still served: {out}");
    let err = c
        .volumes
        .remove_export(v1::RemoveExportRequest {
            name: "disk".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}
