#!/usr/bin/env bash
# System packages Weir needs to build and test: protoc (lance's build scripts), PostgreSQL 15
# server and client binaries (the throwaway clusters), python3 with venv (tool venvs), openssl
# (the TLS test makes a self-signed certificate), the server headers and clang (the FDW).
# Installs what is missing with apt-get when run as root; otherwise says what to install.
set -euo pipefail
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
command -v psql >/dev/null || missing+=(postgresql-client-15)
command -v cc >/dev/null || missing+=(gcc)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v openssl >/dev/null || missing+=(openssl)
# The FDW (crates/weir-fdw) builds against the server headers with bindgen (libclang).
[ -f /usr/include/postgresql/15/server/postgres.h ] || missing+=(postgresql-server-dev-15)
command -v clang >/dev/null || missing+=(clang libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "weir needs: ${missing[*]} (sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The packaged cluster is not used (Weir starts its own); keep it off port 5432.
if command -v pg_ctlcluster >/dev/null; then pg_ctlcluster 15 main stop >/dev/null 2>&1 || true; fi
