#!/usr/bin/env bash
# The aligned dependency set: ONE arrow, ONE datafusion, ONE object_store, ONE parquet, ONE tonic
# (normal and dev edges: arrow-flight is used by the e2e tests until the Flight server lands).
set -euo pipefail
dups=$(cargo tree -d -e normal,dev --workspace --depth 0 --prefix none 2>/dev/null | grep -E '^(arrow-array|arrow-schema|datafusion|datafusion-common|object_store|parquet|tonic|deltalake-core|lance|sqlparser) v' | sort -u || true)
if [ -n "$dups" ]; then
  echo "duplicate versions of core dependencies (cargo tree -d -e normal,dev):"
  echo "$dups"
  exit 1
fi
for c in arrow-array datafusion object_store parquet deltalake-core lance arrow-flight tonic; do
  n=$(cargo tree -e normal,dev --workspace --prefix none -i "$c" 2>/dev/null | head -1 || true)
  [ -n "$n" ] || { echo "$c is not in the dependency graph"; exit 1; }
  echo "one version: $n"
done
