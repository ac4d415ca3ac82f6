"""Reads Delta tables with the `deltalake` package (PyPI); prints rows and schema as JSON.

usage: read_delta.py TABLE_URI... (storage options as JSON in $WEIR_STORAGE_OPTIONS)
"""
import json
import os
import sys

import pyarrow
from deltalake import DeltaTable, QueryBuilder

options = json.loads(os.environ.get("WEIR_STORAGE_OPTIONS", "{}"))
out = {}
for uri in sys.argv[1:]:
    dt = DeltaTable(uri, storage_options=options or None)
    if "deletionVectors" in (dt.protocol().reader_features or []):
        # pyarrow's dataset cannot apply deletion vectors; delta-rs' DataFusion scan does.
        table = pyarrow.table(QueryBuilder().register("t", dt).execute("SELECT * FROM t").read_all())
        table = table.cast(
            pyarrow.schema(
                [f.with_type(pyarrow.string()) if f.type == pyarrow.string_view() else f for f in table.schema]
            )
        )
    else:
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
