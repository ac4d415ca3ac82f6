#!/usr/bin/env bash
# Local PostgreSQL 15 + the in-repo S3 server, for humans: the same code the tests and the
# demo use (weir-testkit), in the foreground. Prints the exports to paste; Ctrl-C stops both.
#   infra/local/services.sh [--dir DIR] [--s3-addr 127.0.0.1:9000] [--bucket weir]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
exec cargo run --quiet -p weir-cli --bin weir -- services "$@"
