#!/usr/bin/env bash
# Builds the weir_fdw extension (crates/weir-fdw, pgrx 0.16.1 + supabase-wrappers 0.1.28) and
# installs it into the system PostgreSQL 15, where the tests' throwaway clusters find it.
# First run: installs cargo-pgrx 0.16.1 (~12 min) and builds the extension (~8 min); later
# runs take seconds. WEIR_FDW_PROFILE=release builds an optimized extension (benchmarks).
set -euo pipefail
cd "$(dirname "$0")/../.."
pg_config=/usr/lib/postgresql/15/bin/pg_config
if ! cargo pgrx --version 2>/dev/null | grep -q "0.16.1"; then
  echo "installing cargo-pgrx 0.16.1"
  cargo install cargo-pgrx --version 0.16.1 --locked
fi
if ! grep -qs "pg15" "$HOME/.pgrx/config.toml"; then
  cargo pgrx init --pg15 "$pg_config"
fi
profile=()
[ "${WEIR_FDW_PROFILE:-debug}" = release ] && profile=(--release)
cd crates/weir-fdw
CARGO_TARGET_DIR="${WEIR_FDW_TARGET:-$HOME/.cache/weir/fdw-target}" \
  cargo pgrx install "${profile[@]}" --pg-config "$pg_config"
