//! Compiles the `.proto` files with protox (pure Rust), so no system protoc
//! is needed, and saves the descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=blockmirror");
    let files = ["blockmirror/v1/volume.proto", "blockmirror/v1/job.proto"];
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("blockmirror_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // `bytes` fields become `bytes::Bytes`, so a guest write's buffer is shared, not copied.
    tonic_prost_build::configure()
        .bytes(".blockmirror.v1")
        // Boxed so a Job stays small enough to move around by value (watch
        // snapshots, lists); the percentiles are read rarely.
        .boxed(".blockmirror.v1.Job.write_latency")
        .compile_fds(fds)?;
    Ok(())
}
