#!/usr/bin/env bash
# Python tools the tests drive (PyPI): `deltalake`, `pyarrow` and the ADBC Flight SQL driver, pylance, in a venv
# outside the checkout ($WEIR_TOOLS/pyvenv, default ~/.cache/weir/tools/pyvenv). Prints the
# venv's python path.
set -euo pipefail
tools="${WEIR_TOOLS:-$HOME/.cache/weir/tools}"
venv="$tools/pyvenv"
mkdir -p "$tools"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
if ! "$venv/bin/python" -c 'import deltalake, lance, pyarrow, pyarrow.flight, adbc_driver_flightsql.dbapi' 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check 'deltalake==1.6.6' 'pyarrow==26.0.1' \
    'adbc-driver-manager==1.13.0' 'adbc-driver-flightsql==1.13.0' 'pylance==14.0.2' >&2
fi
echo "$venv/bin/python"
