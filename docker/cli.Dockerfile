# syntax=docker/dockerfile:1.7
# hotfleet: the operator CLI, for a toolbox pod or a CI job that builds, signs
# and pushes patches. `hotfleet patch build` compiles every module with a
# Python, so this image is Debian slim with python3 (not distroless).
# Build from the repository root:
#   docker build -f docker/cli.Dockerfile -t hotfleet/cli:0.1.0 .
# See docker/README.md.

# ---- build -------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hotfleet-cli --bin hotfleet \
 && install -D -m 0755 target/release/hotfleet /out/hotfleet

# ---- run ---------------------------------------------------------------------
FROM debian:bookworm-slim
# Unpinned on purpose: the image should get bookworm's security updates on
# every rebuild; python3 is only the patch compiler.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 hotfleet \
 && useradd --uid 65532 --gid 65532 --home-dir /home/hotfleet --create-home --shell /usr/sbin/nologin hotfleet
COPY --from=build /out/hotfleet /usr/local/bin/hotfleet
USER 65532:65532
WORKDIR /home/hotfleet
ENTRYPOINT ["/usr/local/bin/hotfleet"]
CMD ["--help"]
