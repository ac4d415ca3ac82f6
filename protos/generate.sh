#!/usr/bin/env bash
# Regenerates the checked-in Rust code of protos/ (crates/weir-flight/src/gen/) with prost-build.
# Needs protoc (Debian: protobuf-compiler).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cargo run --quiet --manifest-path "$here/gen/Cargo.toml" --target-dir "${CARGO_TARGET_DIR:-$here/gen/target}/protos-gen"
