# The image Cloud Run runs (deploy/cloudrun/cloudbuild.yaml builds it from
# the repository root, as the Go service's pipeline does).
#
# Build stage: the same Debian release as the runtime base, so the binary
# needs no newer glibc than the base has.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Build settings (aws-lc's entropy sources: see .cargo/config.toml).
COPY .cargo ./.cargo
COPY src ./src
COPY migrations ./migrations
# Cargo.toml names the benchmark target; cargo reads it even for a build.
COPY benches ./benches
# cargo auditable embeds the dependency list (crate names, versions, sources)
# in a `.dep-v0` section, so image scanners can read what the binary was built
# from; scripts/test builds the tested release binary the same way.
# The commit reported by the git_short_commit series (cloudbuild.yaml passes
# it; without it the series says "No commit specified", as Go's does).
ARG GIT_SHORT_COMMIT=""
RUN cargo install --locked --version 0.7.7 cargo-auditable \
    && cargo auditable build --release --locked \
    && install -m 0755 target/release/token-exchange /token-exchange

# Runtime: glibc, libgcc and CA certificates (for Datastore over TLS), no
# shell, running as the unprivileged user 65532. tests/runtime_image.rs
# runs the binary in a file system made of exactly these packages.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /token-exchange /token-exchange
# The API and the Prometheus metrics.
EXPOSE 8080 9990
USER 65532:65532
# No arguments: it serves, configured by the environment (see README).
ENTRYPOINT ["/token-exchange"]
