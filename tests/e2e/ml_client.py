"""ML reads from PyPI clients, driven by tests/e2e/ml.rs.

usage: ml_client.py PORT DATASET LISTING_ID REQUESTS_JSON
  pylance opens DATASET (vectors/listings.lance): row count and the sum of listing_ids;
  pyarrow.flight: SimilarListings as a DoGet ticket (hand-encoded protobuf in
  google.protobuf.Any) near LISTING_ID, and point-in-time retrieval as a DoExchange of the
  requests ([[listing_id, ts_iso], ...]) in two batches; ADBC Flight SQL: the table functions
  similar_listings(LISTING_ID, 5) and features_at(...).
Prints one JSON object. Leaves with os._exit (see read_delta.py).
"""
import datetime
import json
import os
import sys
import warnings

warnings.simplefilter("ignore")

import adbc_driver_flightsql.dbapi as flightsql  # noqa: E402
import lance  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.flight as flight  # noqa: E402
from protowire import any_of, field, number  # noqa: E402

port, dataset, listing_id, requests = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
uri = f"grpc://127.0.0.1:{port}"
USER, PASSWORD = "analyst", "s3cret"


def jsonable(v):
    if isinstance(v, datetime.datetime):
        return v.isoformat()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


out = {}
ds = lance.dataset(dataset)
ids = ds.to_table(columns=["listing_id"]).column("listing_id").to_pylist()
out["pylance_rows"] = ds.count_rows()
out["pylance_id_sum"] = sum(ids)
out["pylance_indices"] = sorted(i["name"] for i in ds.list_indices())

client = flight.FlightClient(uri)
header = client.authenticate_basic_token(USER.encode(), PASSWORD.encode())
opts = flight.FlightCallOptions(headers=[header])

# SimilarListings { listing_id = 1; k = 3; columns = 5 }
similar = number(1, listing_id) + number(3, 5) + field(5, b"country") + field(5, b"make")
table = client.do_get(flight.Ticket(any_of("type.googleapis.com/weir.v1.SimilarListings", similar)), opts).read_all()
out["doget_similar"] = table.column("listing_id").to_pylist()
out["doget_columns"] = table.column_names

descriptor = flight.FlightDescriptor.for_command(any_of("type.googleapis.com/weir.v1.PointInTimeFeatures", b""))
writer, reader = client.do_exchange(descriptor, opts)
req = pa.table({
    "listing_id": pa.array([r[0] for r in requests], pa.int64()),
    "ts": pa.array([datetime.datetime.fromisoformat(r[1]) for r in requests], pa.timestamp("us", "UTC")),
    "label": pa.array(list(range(len(requests))), pa.int32()),
})
half = len(requests) // 2
writer.begin(req.schema)
rows = []
for part in (req.slice(0, half), req.slice(half)):
    writer.write_table(part)
    rows.extend(reader.read_chunk().data.to_pylist())
writer.done_writing()
writer.close()
out["exchange"] = [{k: jsonable(v) for k, v in r.items()} for r in rows]

with flightsql.connect(uri, db_kwargs={"username": USER, "password": PASSWORD}) as conn:
    cur = conn.cursor()
    cur.execute(f"SELECT listing_id FROM similar_listings({listing_id}, 5)")
    out["sql_similar"] = cur.fetch_arrow_table().column("listing_id").to_pylist()
    first = requests[-1]
    cur.execute(f"SELECT price_last_eur, feature_valid_from FROM features_at({first[0]}, TIMESTAMP '{first[1]}')")
    t = cur.fetch_arrow_table().to_pylist()
    out["sql_features_at"] = [{k: jsonable(v) for k, v in r.items()} for r in t]
    cur.execute("SELECT count(*) AS n FROM vectors.listings")
    out["sql_vectors_rows"] = cur.fetch_arrow_table().column("n")[0].as_py()

print(json.dumps(out))
sys.stdout.flush()
os._exit(0)
