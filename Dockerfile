# walshore's container image: built with the project's pinned toolchain, run as a
# non-root user on distroless (glibc, CA certificates, no shell, no package manager).
#   docker build -t walshore .
#   docker run -v $PWD/config.toml:/etc/walshore/config.toml:ro -e PGPASSWORD walshore
# Secrets come from the environment (ECS injects them from Secrets Manager), never from
# the image. tests/deploy.rs checks this file against the repository and runs its
# health check and command against a live walshore.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, on their own layer: a change to walshore's code rebuilds only it.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src bench \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs bench/drain.rs bench/lifetime.rs \
    && cargo build --release --locked --bin walshore \
    && rm -rf src bench
COPY src src
COPY bench bench
COPY sql sql
# The release profile carries no debug info (the `profiling` profile keeps it).
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin walshore

FROM gcr.io/distroless/cc-debian12:nonroot
# The CA bundle for sslmode=verify-full against RDS and Aurora.
ADD --chmod=644 https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem /etc/walshore/rds-global-bundle.pem
COPY --from=build /src/target/release/walshore /usr/local/bin/walshore
COPY config.toml /etc/walshore/config.example.toml
USER nonroot
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/walshore"]
CMD ["run", "--config", "/etc/walshore/config.toml"]
# No shell or curl in the image: walshore asks its own /healthz ([metrics] listen).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["/usr/local/bin/walshore", "health", "--config", "/etc/walshore/config.toml"]
