"""The client side of `weir-bench serve`: pyarrow.flight against `weir serve`.

usage: flight_read.py PORT USER PASSWORD RUNS IDS (comma-separated listing_ids to look up)
Prints JSON lines: one per full read of ads_vw (seconds, rows, bytes), then the latencies
of one point lookup per id by listing_id (each a full Flight SQL round trip: GetFlightInfo +
DoGet), in milliseconds.
"""
import json
import sys
import time

from flightsql import connect

port, user, password, runs, ids = sys.argv[1:6]
read = connect(port, user, password)


for _ in range(int(runs)):
    t = time.perf_counter()
    table = read("SELECT * FROM ads_vw")
    print(json.dumps({"full": time.perf_counter() - t, "rows": table.num_rows, "bytes": table.nbytes}), flush=True)

lat = []
for lid in [int(i) for i in ids.split(",")]:
    t = time.perf_counter()
    read(f"SELECT * FROM ads_vw WHERE listing_id = {lid}")
    lat.append((time.perf_counter() - t) * 1000)
print(json.dumps({"lookups_ms": lat}), flush=True)
