# syntax=docker/dockerfile:1.7
# hotfleet-agent: the node agent (charts/hotfleet's DaemonSet, or the sidecar game charts include),
# and hotfleet-relay beside it in the same image (run it with --entrypoint /usr/local/bin/hotfleet-relay).
# Build from the repository root (the whole workspace is the build context):
#   docker build -f docker/agent.Dockerfile -t hotfleet/agent:0.1.0 .
# See docker/README.md.

# ---- build -------------------------------------------------------------------
# The toolchain hotfleet is built and tested with (rust-version 1.88 is the
# floor); protos compile with protox, so no protoc.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds; the binary is
# copied out because the target/ mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hotfleet-agent --bin hotfleet-agent --bin hotfleet-relay \
 && install -D -m 0755 target/release/hotfleet-agent /out/hotfleet-agent \
 && install -D -m 0755 target/release/hotfleet-relay /out/hotfleet-relay

# ---- run ---------------------------------------------------------------------
# distroless cc: glibc and CA certificates, no shell, no package manager; the
# :nonroot tag runs as uid/gid 65532 (the chart's securityContext matches).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/hotfleet-agent /usr/local/bin/hotfleet-agent
COPY --from=build /out/hotfleet-relay /usr/local/bin/hotfleet-relay
USER 65532:65532
EXPOSE 7701
ENTRYPOINT ["/usr/local/bin/hotfleet-agent"]
