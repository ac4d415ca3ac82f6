"""Reads Delta tables with the `deltalake` package (PyPI); prints rows and schema as JSON.

usage: read_delta.py TABLE_URI... (storage options as JSON in $WEIR_STORAGE_OPTIONS)
"""
import json
import os
import sys

from deltalake import DeltaTable

options = json.loads(os.environ.get("WEIR_STORAGE_OPTIONS", "{}"))
out = {}
for uri in sys.argv[1:]:
    dt = DeltaTable(uri, storage_options=options or None)
    table = dt.to_pyarrow_dataset().to_table()
    out[uri] = {
        "version": dt.version(),
        "rows": table.num_rows,
        "schema": [[f.name, str(f.type)] for f in table.schema],
        "partitions": dt.metadata().partition_columns,
    }
print(json.dumps(out))
sys.stdout.flush()
# deltalake's native runtime can abort during interpreter teardown ("terminate called without
# an active exception"); the work is done, so leave without tearing down.
os._exit(0)
