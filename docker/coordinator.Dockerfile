# syntax=docker/dockerfile:1.7
# hotfleet-coordinator: the coordinator (charts/hotfleet's StatefulSet).
# Build from the repository root (the whole workspace is the build context):
#   docker build -f docker/coordinator.Dockerfile -t hotfleet/coordinator:0.1.0 .
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
    cargo build --release --locked -p hotfleet-coordinator --bin hotfleet-coordinator \
 && install -D -m 0755 target/release/hotfleet-coordinator /out/hotfleet-coordinator

# ---- run ---------------------------------------------------------------------
# distroless cc: glibc and CA certificates, no shell, no package manager; the
# :nonroot tag runs as uid/gid 65532 (the chart's securityContext matches).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/hotfleet-coordinator /usr/local/bin/hotfleet-coordinator
USER 65532:65532
EXPOSE 7700
ENTRYPOINT ["/usr/local/bin/hotfleet-coordinator"]
