# syntax=docker/dockerfile:1
# Build: docker build -t newapi-exporter .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin newapi-exporter

FROM debian:bookworm-slim
RUN useradd --system --uid 10160 --no-create-home newapi-exporter
COPY --from=build /src/target/release/newapi-exporter /usr/local/bin/newapi-exporter
USER newapi-exporter
# The official gateway image keeps its database at /data/one-api.db.
ENV SQLITE_PATH=/data/one-api.db
EXPOSE 10160
ENTRYPOINT ["newapi-exporter"]
CMD ["serve"]
