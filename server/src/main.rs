//! The `blockmirrord` binary: parse, set up logging, bind, run.
//! Exit codes: 0 clean shutdown, 64 bad configuration, 1 runtime failure.

use blockmirror_server::config::Config;
use clap::Parser;
use std::process::ExitCode;

const EX_USAGE: u8 = 64;

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = blockmirror_server::telemetry::init(&config.log) {
        eprintln!("error: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let listeners = blockmirror_server::bind(&config.listeners()).await?;
        let nbd_listeners = blockmirror_server::bind(&config.nbd_listeners()).await?;
        blockmirror_server::run(&config, listeners, nbd_listeners, shutdown_signal()).await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
