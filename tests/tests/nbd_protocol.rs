//! The NBD server against bad and unusual peers, spoken byte by byte:
//! malformed or truncated handshakes, unknown options and commands, lengths
//! over 32 MiB, offsets past the end, clients that vanish mid-request,
//! pipelined requests. Each gets the right error reply or a clean close of
//! its own connection, and other clients go on being served.

// Test sizes and names are tiny; casts between integer widths cannot truncate here.
#![allow(clippy::cast_possible_truncation)]

use blockmirror_nbd::consts::*;
use blockmirror_nbd::option::{self, encode_go, encode_option};
use blockmirror_nbd::reply::{ReplyHeader, header_rest_len, parse_header};
use blockmirror_nbd::request::{Command, Request};
use blockmirror_tests::TestServer;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const SIZE: u64 = 16 << 20;

struct Raw(UnixStream);

impl Raw {
    /// Connects and reads the greeting.
    fn connect(server: &TestServer) -> Self {
        let s = UnixStream::connect(&server.nbd_socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Self(s);
        let g = r.read_n(18).expect("greeting");
        assert_eq!(&g[..16], &option::greeting()[..16]);
        r
    }

    /// Connects, negotiates (optionally structured replies and
    /// base:allocation) and selects `export` with NBD_OPT_GO.
    fn open(server: &TestServer, export: &str, structured: bool) -> (Self, u16) {
        let mut r = Self::connect(server);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            r.send(&encode_option(OPT_STRUCTURED_REPLY, &[]));
            assert_eq!(r.opt_reply().1, REP_ACK);
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            r.send(&encode_option(OPT_SET_META_CONTEXT, &d));
            assert_eq!(r.opt_reply().1, REP_META_CONTEXT);
            assert_eq!(r.opt_reply().1, REP_ACK);
        }
        r.send(&encode_option(OPT_GO, &encode_go(export, &[])));
        let mut flags = 0;
        loop {
            let (_, ty, data) = r.opt_reply();
            match ty {
                REP_INFO if data[..2] == INFO_EXPORT.to_be_bytes() => {
                    assert_eq!(u64::from_be_bytes(data[2..10].try_into().unwrap()), SIZE);
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!(
                    "GO failed: reply {other:#x} {:?}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        (r, flags)
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("send");
    }

    fn read_n(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b)?;
        Ok(b)
    }

    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20).expect("option reply");
        let (opt, ty, len) = option::parse_option_reply_header(&h).unwrap();
        (opt, ty, self.read_n(len as usize).unwrap())
    }

    fn request(&mut self, cmd: Command, flags: u16, handle: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            command: cmd,
            handle,
            offset,
            length,
        };
        self.send(&r.encode());
    }

    /// Reads one reply header (and its payload for structured chunks).
    fn reply(&mut self) -> (ReplyHeader, Vec<u8>) {
        let m = self.read_n(4).expect("reply magic");
        let magic = u32::from_be_bytes(m.try_into().unwrap());
        let rest = self.read_n(header_rest_len(magic).unwrap()).unwrap();
        let h = parse_header(magic, &rest).unwrap();
        let payload = match h {
            ReplyHeader::Structured { length, .. } => self.read_n(length as usize).unwrap(),
            ReplyHeader::Simple { .. } => Vec::new(),
        };
        (h, payload)
    }

    fn simple_error(&mut self, handle: u64) -> u32 {
        match self.reply().0 {
            ReplyHeader::Simple { error, handle: h } => {
                assert_eq!(h, handle);
                error
            }
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0))
            || matches!(self.0.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

async fn server() -> TestServer {
    let server = TestServer::start();
    let mut c = server.clients().await;
    c.create_volume("disk", SIZE).await;
    c.export("disk", false).await;
    c.create_volume("ro", SIZE).await;
    c.export("ro", true).await;
    server
}

/// A healthy client still gets served.
fn still_serving(server: &TestServer) {
    let (mut r, _) = Raw::open(server, "disk", false);
    r.request(Command::Read, 0, 77, 0, 512);
    assert_eq!(r.simple_error(77), 0);
    assert_eq!(r.read_n(512).unwrap().len(), 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_close_only_their_connection() {
    let server = server().await;
    // Unknown client flags.
    let mut r = Raw::connect(&server);
    r.send(&0xffff_ffffu32.to_be_bytes());
    assert!(r.closed());
    // Truncated option header, then gone.
    let mut r = Raw::connect(&server);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    r.send(&encode_option(OPT_GO, &[])[..7]);
    drop(r);
    // Bad option magic.
    let mut r = Raw::connect(&server);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    r.send(&[0x55; 16]);
    assert!(r.closed());
    // An option payload over the limit.
    let mut r = Raw::connect(&server);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let mut hdr = encode_option(OPT_GO, &[]);
    hdr[12..16].copy_from_slice(&(1u32 << 30).to_be_bytes());
    r.send(&hdr);
    assert!(r.closed());
    // A client that connects and says nothing, left open while others work.
    let _idle = Raw::connect(&server);
    still_serving(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_errors_are_replies_and_the_handshake_goes_on() {
    let server = server().await;
    let mut r = Raw::connect(&server);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    r.send(&encode_option(999, b"x"));
    assert_eq!(r.opt_reply().1, REP_ERR_UNSUP);
    r.send(&encode_option(OPT_GO, &encode_go("nope", &[])));
    let (_, ty, msg) = r.opt_reply();
    assert_eq!(ty, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    // Name length larger than the payload.
    r.send(&encode_option(OPT_GO, &[0, 0, 3, 232, b'a', b'b']));
    assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
    r.send(&encode_option(OPT_LIST, &[1]));
    assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
    r.send(&encode_option(OPT_STARTTLS, &[]));
    assert_eq!(r.opt_reply().1, REP_ERR_POLICY);
    // Meta contexts need structured replies first.
    r.send(&encode_option(
        OPT_SET_META_CONTEXT,
        &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0, 0, 0],
    ));
    assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
    r.send(&encode_option(OPT_LIST, &[]));
    let mut names = Vec::new();
    loop {
        let (_, ty, data) = r.opt_reply();
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_SERVER);
        names.push(String::from_utf8(data[4..].to_vec()).unwrap());
    }
    assert_eq!(names, vec!["disk", "ro"]);
    r.send(&encode_option(OPT_ABORT, &[]));
    assert_eq!(r.opt_reply().1, REP_ACK);
    assert!(r.closed());
    // Old-style EXPORT_NAME to an unknown export: closed (no way to say why).
    let mut r = Raw::connect(&server);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    r.send(&encode_option(OPT_EXPORT_NAME, b"nope"));
    assert!(r.closed());
    // ... and to a known one: size and flags.
    let mut r = Raw::connect(&server);
    r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    r.send(&encode_option(OPT_EXPORT_NAME, b"disk"));
    let rep = r.read_n(10).unwrap();
    assert_eq!(u64::from_be_bytes(rep[..8].try_into().unwrap()), SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies() {
    let server = server().await;
    let (mut r, flags) = Raw::open(&server, "disk", false);
    assert!(flags & FLAG_SEND_WRITE_ZEROES != 0 && flags & FLAG_READ_ONLY == 0);
    r.request(Command::Read, 0, 1, 0, (32 << 20) + 1);
    assert_eq!(r.simple_error(1), EINVAL);
    r.request(Command::Read, 0, 2, SIZE - 512, 1024);
    assert_eq!(r.simple_error(2), EINVAL);
    r.request(Command::Read, 0, 3, u64::MAX - 10, 100);
    assert_eq!(r.simple_error(3), EINVAL);
    r.request(Command::Write, 0, 4, SIZE - 2, 4);
    r.send(&[1, 2, 3, 4]);
    assert_eq!(r.simple_error(4), ENOSPC);
    r.request(Command::Unknown(99), 0, 5, 0, 0);
    assert_eq!(r.simple_error(5), EINVAL);
    r.request(Command::BlockStatus, 0, 6, 0, 4096);
    assert_eq!(r.simple_error(6), EINVAL, "no meta context was negotiated");
    r.request(Command::Trim, 0, 7, SIZE, 4096);
    assert_eq!(r.simple_error(7), ENOSPC);
    r.request(Command::Cache, 0, 8, 0, 4096);
    assert_eq!(r.simple_error(8), 0);
    r.request(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 9, 0, 4096);
    assert_eq!(r.simple_error(9), 0);
    // The connection still works after all that.
    r.request(Command::Write, CMD_FLAG_FUA, 10, 4096, 3);
    r.send(b"abc");
    assert_eq!(r.simple_error(10), 0);
    r.request(Command::Read, 0, 11, 4096, 3);
    assert_eq!(r.simple_error(11), 0);
    assert_eq!(r.read_n(3).unwrap(), b"abc");
    // A big write (read and applied in slices) past the end: its payload
    // is swallowed, nothing is written, the error comes back, and the
    // connection stays in step.
    let big = vec![0x5a_u8; 3 << 20];
    r.request(Command::Write, 0, 14, SIZE - (1 << 20), 3 << 20);
    r.send(&big);
    assert_eq!(r.simple_error(14), ENOSPC);
    r.request(Command::Read, 0, 15, SIZE - (1 << 20), 4096);
    assert_eq!(r.simple_error(15), 0);
    assert!(r.read_n(4096).unwrap().iter().all(|&b| b == 0));
    // Read-only export: writes are refused with EPERM, big ones too.
    let (mut ro, flags) = Raw::open(&server, "ro", false);
    assert!(flags & FLAG_READ_ONLY != 0);
    ro.request(Command::Write, 0, 12, 0, 2);
    ro.send(b"xy");
    assert_eq!(ro.simple_error(12), EPERM);
    ro.request(Command::Trim, 0, 13, 0, 4096);
    assert_eq!(ro.simple_error(13), EPERM);
    ro.request(Command::Write, 0, 16, 0, 3 << 20);
    ro.send(&big);
    assert_eq!(ro.simple_error(16), EPERM);
    ro.request(Command::Read, 0, 17, 0, 4096);
    assert_eq!(ro.simple_error(17), 0);
    assert!(ro.read_n(4096).unwrap().iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrecoverable_requests_close_the_connection_only() {
    let server = server().await;
    // Bad request magic.
    let (mut r, _) = Raw::open(&server, "disk", false);
    r.send(&[0u8; 28]);
    assert!(r.closed());
    // A write payload over 32 MiB.
    let (mut r, _) = Raw::open(&server, "disk", false);
    r.request(Command::Write, 0, 1, 0, (32 << 20) + 1);
    assert!(r.closed());
    // A client that vanishes in the middle of a write payload.
    let (mut r, _) = Raw::open(&server, "disk", false);
    r.request(Command::Write, 0, 2, 0, 1 << 20);
    r.send(&[9u8; 100]);
    drop(r);
    // A client that sends a request and leaves without its reply.
    let (mut r, _) = Raw::open(&server, "disk", false);
    r.request(Command::Read, 0, 3, 0, 16 << 20);
    drop(r);
    still_serving(&server);
    // Disconnect is clean.
    let (mut r, _) = Raw::open(&server, "disk", false);
    r.request(Command::Disconnect, 0, 4, 0, 0);
    assert!(r.closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_and_block_status() {
    let server = server().await;
    let (mut r, flags) = Raw::open(&server, "disk", true);
    assert!(flags & FLAG_SEND_DF != 0);
    r.request(Command::Write, 0, 1, 1 << 20, 4096);
    r.send(&[5u8; 4096]);
    assert_eq!(r.simple_error(1), 0);
    r.request(Command::Read, 0, 2, 1 << 20, 4096);
    match r.reply() {
        (
            ReplyHeader::Structured {
                flags,
                ty,
                handle: 2,
                ..
            },
            payload,
        ) => {
            assert_eq!(ty, REPLY_TYPE_OFFSET_DATA);
            assert!(flags & REPLY_FLAG_DONE != 0);
            assert_eq!(
                u64::from_be_bytes(payload[..8].try_into().unwrap()),
                1 << 20
            );
            assert!(payload[8..].iter().all(|&b| b == 5));
        }
        other => panic!("{other:?}"),
    }
    r.request(Command::Read, 0, 3, SIZE, 4096);
    match r.reply() {
        (ReplyHeader::Structured { ty, handle: 3, .. }, payload) => {
            assert_eq!(ty, REPLY_TYPE_ERROR);
            assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);
            let msg = String::from_utf8_lossy(&payload[6..]).into_owned();
            assert!(msg.contains("past the end"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    r.request(Command::BlockStatus, 0, 4, 0, 4 << 20);
    match r.reply() {
        (ReplyHeader::Structured { ty, handle: 4, .. }, payload) => {
            assert_eq!(ty, REPLY_TYPE_BLOCK_STATUS);
            let desc: Vec<(u32, u32)> = payload[4..]
                .chunks(8)
                .map(|c| {
                    (
                        u32::from_be_bytes(c[..4].try_into().unwrap()),
                        u32::from_be_bytes(c[4..].try_into().unwrap()),
                    )
                })
                .collect();
            assert_eq!(desc[0], (1 << 20, STATE_HOLE | STATE_ZERO), "{desc:?}");
            assert_eq!(desc[1].1, 0, "{desc:?}");
        }
        other => panic!("{other:?}"),
    }
    r.request(Command::BlockStatus, CMD_FLAG_REQ_ONE, 5, 0, 4 << 20);
    let (_, payload) = r.reply();
    assert_eq!(payload.len(), 4 + 8, "REQ_ONE gives one extent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_all_get_replies() {
    let server = server().await;
    let (mut r, _) = Raw::open(&server, "disk", false);
    const N: u64 = 200;
    // More than the per-connection in-flight bound: the server must apply
    // backpressure (stop reading) rather than drop or deadlock.
    let mut w = Raw(r.0.try_clone().unwrap());
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            w.request(Command::Write, 0, i, i * 65536, 65536);
            w.send(&vec![(i % 250) as u8 + 1; 65536]);
        }
        for i in 0..N {
            w.request(Command::Read, 0, N + i, i * 65536, 65536);
        }
    });
    let mut seen = std::collections::BTreeSet::new();
    let mut reads = 0;
    while seen.len() < 2 * N as usize {
        let (h, _) = r.reply();
        let ReplyHeader::Simple { error, handle } = h else {
            panic!("{h:?}")
        };
        assert_eq!(error, 0);
        if handle >= N {
            let data = r.read_n(65536).unwrap();
            let i = handle - N;
            // Reads were issued after their writes were sent, but may run
            // before the write completes only if the server reordered them
            // — it may, so accept either the new bytes or zeroes.
            assert!(data.iter().all(|&b| b == (i % 250) as u8 + 1) || data.iter().all(|&b| b == 0));
            reads += 1;
        }
        assert!(seen.insert(handle), "duplicate reply for {handle}");
    }
    writer.join().unwrap();
    assert_eq!(reads, N);
}
