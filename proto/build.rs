//! Compiles `hotfleet/v1/*.proto` with the pure-Rust `protox` (no protoc needed),
//! generates tonic/prost code, proto3-JSON serde impls (for the local runtime
//! protocol) and a descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "hotfleet/v1/patch.proto",
        "hotfleet/v1/agent.proto",
        "hotfleet/v1/coordinator.proto",
        "hotfleet/v1/runtime.proto",
    ];
    println!("cargo:rerun-if-changed=hotfleet");
    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("hotfleet_descriptor.bin");
    fs::write(&descriptor_path, descriptors.encode_to_vec())?;

    // Every service on prost with small first buffers (src/codec.rs).
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .codec_path("crate::codec::SmallBuffers")
        .compile_fds(descriptors)?;

    let descriptor_bytes = fs::read(&descriptor_path)?;
    pbjson_build::Builder::new().register_descriptors(&descriptor_bytes)?.build(&[".hotfleet.v1"])?;
    Ok(())
}
