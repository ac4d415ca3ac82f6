"""Point lookups and full reads of a mart against a running `weir serve`, by hand.

usage: lookups.py PORT USER PASSWORD [MART] [N]
Reads the mart's listing_ids, then times N point lookups spread evenly over them (each a full
Flight SQL round trip: GetFlightInfo + DoGet, one row expected) and the best of 3 full reads.
For lakes that no bench command builds (e.g. after `weir sync` + `weir derive` of CDC days).
"""
import sys
import time

from flightsql import connect

port, user, password = sys.argv[1:4]
mart = sys.argv[4] if len(sys.argv) > 4 else "ads_vw"
n = int(sys.argv[5]) if len(sys.argv) > 5 else 300
read = connect(port, user, password)

ids = read(f"SELECT listing_id FROM {mart} ORDER BY listing_id").column(0).to_pylist()
ids = ids[:: max(1, len(ids) // n)][:n]
full = []
for _ in range(3):
    t = time.perf_counter()
    table = read(f"SELECT * FROM {mart}")
    full.append(time.perf_counter() - t)
lat = []
for lid in ids:
    t = time.perf_counter()
    rows = read(f"SELECT * FROM {mart} WHERE listing_id = {lid}").num_rows
    lat.append((time.perf_counter() - t) * 1000)
    if rows != 1:
        sys.exit(f"{mart}: listing_id {lid} gave {rows} rows, not 1")
lat.sort()
print(
    f"{mart}: {table.num_rows} rows, full read best {min(full):.3f} s; "
    f"{len(lat)} lookups p50 {lat[len(lat) // 2]:.1f} ms p95 {lat[int(len(lat) * 0.95)]:.1f} ms"
)
