# The single Loupe image: every role (`loupe ingester`, `loupe querier`,
# `loupe operator`, …) and the sidecar run this binary.
#
#   docker build -t ghcr.io/loupe-dev/loupe:0.1.0 .
#
# The operator and the Helm chart default to ghcr.io/loupe-dev/loupe:<version of the
# crate>, so tag the image with the workspace version (Cargo.toml) or set `image`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# librdkafka links the system zlib, which the runtime image does not carry: it is
# copied next to the binary's other libraries.
RUN cargo build --release --locked --bin loupe \
 && mkdir -p /out/lib \
 && cp target/release/loupe /out/loupe \
 && cp "$(ldd target/release/loupe | awk '/libz\.so/ { print $3 }')" /out/lib/

# glibc and libgcc, CA certificates, a non-root user (65532) and no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lib/ /usr/lib/
COPY --from=build /out/loupe /usr/local/bin/loupe
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/loupe"]
CMD ["--help"]
