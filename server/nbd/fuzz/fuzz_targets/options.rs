//! Handshake options as a server receives them: header, then payload.
//! Parsing must never panic, whatever the bytes.
#![no_main]

use blockmirror_nbd::option::{OPTION_HEADER_LEN, parse_option, parse_option_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a full option: header + payload.
    if data.len() >= OPTION_HEADER_LEN
        && let Ok((opt, len)) = parse_option_header(&data[..OPTION_HEADER_LEN])
    {
        let payload = &data[OPTION_HEADER_LEN..];
        let _ = parse_option(opt, &payload[..payload.len().min(len as usize)]);
    }
    // As a bare payload of every option type the server knows.
    if let Some((&kind, payload)) = data.split_first() {
        let _ = parse_option(u32::from(kind % 12), payload);
    }
});
