"""The client side of `weir-bench serve`: pyarrow.flight against `weir serve`.

usage: flight_read.py PORT USER PASSWORD RUNS IDS (comma-separated listing_ids to look up)
Prints JSON lines: one per full read of ads_vw (seconds, rows, bytes), then the latencies
of one point lookup per id by listing_id (each a full Flight SQL round trip: GetFlightInfo +
DoGet), in milliseconds.
"""
import json
import sys
import time

import pyarrow.flight as flight

port, user, password, runs, ids = sys.argv[1:6]
client = flight.FlightClient(f"grpc://127.0.0.1:{port}")
opts = flight.FlightCallOptions(headers=[client.authenticate_basic_token(user.encode(), password.encode())])


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def field(num, payload):
    return varint((num << 3) | 2) + varint(len(payload)) + payload


def statement(sql):
    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    return field(1, type_url) + field(2, field(1, sql.encode()))


def read(sql):
    info = client.get_flight_info(flight.FlightDescriptor.for_command(statement(sql)), opts)
    return client.do_get(info.endpoints[0].ticket, opts).read_all()


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
