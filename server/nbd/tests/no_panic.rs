//! The parsers never panic, on the fuzz seed corpus and on random bytes
//! (the stable-toolchain companion of the `cargo fuzz` targets in `fuzz/`).

use blockmirror_nbd::option::{
    OPTION_HEADER_LEN, parse_option, parse_option_header, parse_option_reply_header,
};
use blockmirror_nbd::reply::{header_rest_len, parse_header};
use blockmirror_nbd::request::{REQUEST_LEN, Request};
use proptest::prelude::*;

fn feed(data: &[u8]) {
    if data.len() >= OPTION_HEADER_LEN
        && let Ok((opt, len)) = parse_option_header(&data[..OPTION_HEADER_LEN])
    {
        let payload = &data[OPTION_HEADER_LEN..];
        let _ = parse_option(opt, &payload[..payload.len().min(len as usize)]);
    }
    for kind in 0..12 {
        let _ = parse_option(kind, data);
    }
    for chunk in data.chunks(REQUEST_LEN) {
        if let Ok(r) = Request::parse(chunk) {
            assert_eq!(&r.encode()[..], chunk);
        }
    }
    let _ = parse_option_reply_header(data);
    if data.len() >= 4 {
        let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        if let Ok(n) = header_rest_len(magic) {
            let rest = &data[4..];
            let _ = parse_header(magic, &rest[..rest.len().min(n)]);
        }
    }
}

#[test]
fn seed_corpus_parses_without_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut n = 0;
    for dir in ["options", "requests", "replies"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("corpus directory") {
            feed(&std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
    }
    assert!(n >= 25, "corpus has only {n} seeds");
    // The well-formed seeds really parse.
    let go = std::fs::read(root.join("options/go")).unwrap();
    let (opt, len) = parse_option_header(&go[..OPTION_HEADER_LEN]).unwrap();
    assert!(parse_option(opt, &go[OPTION_HEADER_LEN..][..len as usize]).is_ok());
    assert!(Request::parse(&std::fs::read(root.join("requests/read")).unwrap()).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        feed(&data);
    }

    #[test]
    fn mutated_seeds_never_panic(pos in 0usize..64, byte in any::<u8>(), cut in 0usize..64) {
        let mut go = blockmirror_nbd::option::encode_option(7, &blockmirror_nbd::option::encode_go("disk", &[3]));
        let p = pos % go.len();
        go[p] = byte;
        go.truncate(go.len() - cut.min(go.len()));
        feed(&go);
    }
}
