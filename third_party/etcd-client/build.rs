// hotfleet's vendored copy: the upstream build script calls
// `tonic_prost_build::compile_protos`, which runs a `protoc` binary. hotfleet
// builds on a bare machine with nothing but cargo, so the same protos are
// compiled with the pure-Rust `protox` instead (exactly as hotfleet-proto
// does); the generated code is identical in content.

#[cfg(feature = "build-server")]
fn should_build_server() -> bool {
    true
}

#[cfg(not(feature = "build-server"))]
fn should_build_server() -> bool {
    false
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "proto";
    println!("cargo:rerun-if-changed={proto_root}");

    let descriptors = protox::compile(
        [
            "etcd/api/authpb/auth.proto",
            "etcd/api/etcdserverpb/rpc.proto",
            "etcd/api/mvccpb/kv.proto",
            "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
            "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
        ],
        [proto_root],
    )?;
    tonic_prost_build::configure()
        .build_server(should_build_server())
        .compile_fds(descriptors)?;
    Ok(())
}
