//! `otlp-sink [ADDR]`: an OTLP/gRPC receiver that counts spans, for the
//! telemetry benchmark (bench/telemetry.py). Prints `listening HOST:PORT`
//! once bound, then `spans N requests M` whenever a line arrives on stdin
//! and when stdin closes (then it exits).

use blockmirror_tests::otlp::Receiver;
use tokio::io::AsyncBufReadExt as _;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let receiver = Receiver::start_with(&addr, false).await?;
    println!("listening {}", receiver.addr);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = lines.next_line().await?;
        let (spans, requests) = receiver.counts();
        println!("spans {spans} requests {requests}");
        if line.is_none() {
            return Ok(());
        }
    }
}
