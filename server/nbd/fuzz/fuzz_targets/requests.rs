//! Transmission requests: a stream of 28-byte headers.
#![no_main]

use blockmirror_nbd::request::{REQUEST_LEN, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for chunk in data.chunks(REQUEST_LEN) {
        if let Ok(r) = Request::parse(chunk) {
            // A parsed header encodes back to the same bytes.
            assert_eq!(&r.encode()[..], chunk);
            let _ = r.end();
        }
    }
});
