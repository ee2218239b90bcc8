# syntax=docker/dockerfile:1
# Build: docker build -t newapi-exporter:0.1.0 .
# Two stages: the release build on Debian's Rust image, then only the binary on distroless
# (glibc and CA certificates, no shell, no package manager), running as an unprivileged user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# What the build reads: the manifest, the build script, the sources, the runbook the binary
# serves at /runbook (include_str!), and the bench target Cargo.toml declares.
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
COPY docs/runbook.md ./docs/runbook.md
ARG REVISION=unknown
ARG BRANCH=unknown
ENV NEWAPI_BUILD_REVISION=${REVISION} NEWAPI_BUILD_BRANCH=${BRANCH}
RUN cargo build --release --locked --bin newapi-exporter

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="newapi-exporter" \
      org.opencontainers.image.description="Prometheus and OpenTelemetry exporter for the new-api / one-api LLM gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/newapi-exporter/newapi-exporter" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/newapi-exporter /usr/local/bin/newapi-exporter
# distroless' nonroot user (65532): the gateway's volume is mounted read-only.
USER nonroot:nonroot
# The official gateway image keeps its database at /data/one-api.db.
ENV SQLITE_PATH=/data/one-api.db
EXPOSE 10160
# The image has no curl: the binary asks its own probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/newapi-exporter", "healthcheck", "--url", "http://127.0.0.1:10160/-/healthy"]
ENTRYPOINT ["/usr/local/bin/newapi-exporter"]
CMD ["serve"]
