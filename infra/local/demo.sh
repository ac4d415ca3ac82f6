#!/usr/bin/env bash
# The first of the README's two commands: install what is missing, build weir, run `weir demo`.
# Extra arguments go to `weir demo` (e.g. --keep, --scale 1, --make bmw).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/local/prereqs.sh
# The FDW extension for the demo's PostgreSQL (first time: ~20 min, cargo-pgrx included).
bash infra/local/fdw.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
cargo build -p weir-cli --bin weir
exec "$CARGO_TARGET_DIR/debug/weir" demo "$@"
