#!/usr/bin/env bash
# The in-repo S3-compatible server alone (s3s-fs with per-key locks), data in DIR.
#   infra/local/s3-server.sh DIR [--addr 127.0.0.1:9000] [--bucket weir] [--region eu-central-1]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
exec cargo run --quiet -p weir-cli --bin weir -- s3-server "$@"
