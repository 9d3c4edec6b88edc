//! Compiles the .proto files with protox (pure Rust), so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/pd/v1/model.proto",
        "proto/pd/v1/cluster.proto",
        "proto/pd/v1/kv_transfer.proto",
        "proto/pd/v1/generation.proto",
        "proto/pd/v1/node.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // KV payloads decode as slices of the received buffer, not as copies.
    tonic_prost_build::configure()
        .bytes(".pd.v1.KvChunk")
        .compile_fds(descriptors)?;
    Ok(())
}
