//! Replies as the NBD client backend parses them.
#![no_main]

use blockmirror_nbd::option::parse_option_reply_header;
use blockmirror_nbd::reply::{header_rest_len, parse_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_option_reply_header(data);
    if data.len() >= 4 {
        let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        if let Ok(n) = header_rest_len(magic) {
            let rest = &data[4..];
            let _ = parse_header(magic, &rest[..rest.len().min(n)]);
        }
    }
});
