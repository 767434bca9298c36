# The operator image: a static binary on distroless, running as a non-root user with nothing
# to write, so the chart's read-only root filesystem and restricted security context fit it.
#
#   docker build -t ghcr.io/agentgate/agentgate:0.1.0 .
#   docker build --build-arg FEATURES=otel ...    # with OpenTelemetry trace export
#
# This project's machines have no container engine: there `make image` builds the equivalent
# image with crane (static glibc binary, one layer, user 65532; deploy/images/build.sh, README "Image").

# Build stage: Alpine's Rust targets musl, so the release binary links statically (TLS is rustls
# with ring, no OpenSSL).
FROM rust:1.95-alpine AS build
ARG FEATURES=""
# make: jemalloc (the operator's allocator) is built from C sources with configure and make.
RUN apk add --no-cache musl-dev make
WORKDIR /src
# Dependencies first, in their own layer: source edits then rebuild only the crate itself.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
RUN mkdir -p src/bin tests/demo tests/bench \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/kubectl-agentgate.rs \
    && touch src/lib.rs tests/demo/demo.rs tests/bench/bench.rs \
    && cargo build --release --locked --features "$FEATURES" --bin agentgate \
    && rm -rf src
COPY src src
# The real sources are newer than the placeholders' build, so cargo rebuilds the crate.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --features "$FEATURES" --bin agentgate \
    && strip target/release/agentgate \
    && ldd target/release/agentgate 2>&1 | grep -q -e 'not a dynamic executable' -e 'statically linked'

# Runtime stage: no shell, no package manager; CA certificates for the API server's TLS and
# /etc/passwd with the nonroot user (65532) come with the base image.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/release/agentgate /usr/local/bin/agentgate
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/agentgate"]
CMD ["run"]
