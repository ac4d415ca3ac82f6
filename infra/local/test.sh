#!/usr/bin/env bash
# The second of the README's two commands, and what CI runs: install what is missing, then
# the whole test suite (unit tests and the end-to-end tests against a real PostgreSQL 15 and
# the real S3 server). Extra arguments go to the test binaries (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/local/prereqs.sh
# The FDW extension goes into the system PostgreSQL before the tests that load it.
bash infra/local/fdw.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
WEIR_PYTHON="$(bash infra/local/pytools.sh)"
export WEIR_PYTHON
exec cargo test --workspace -- "$@"
