"""Flight SQL clients from PyPI against `weir serve`, driven by tests/e2e/flight.rs.

usage: flight_client.py MODE PORT [ARG]
  read      ADBC: ads_vw rows, a prepared statement, the table list; pyarrow.flight: the same
            mart and the table list with hand-encoded Flight SQL commands; bad credentials
  title ID  ADBC: the title and model of one listing in ads_vw
  memory    ADBC: a query that needs more than the server's memory limit
  tls CERT  pyarrow.flight over TLS, trusting CERT: count(*) of ads_vw
  cancel    pyarrow.flight: a long query, one batch read, then the DoGet cancelled
Prints one JSON object. Leaves with os._exit (see read_delta.py).
"""
import json
import os
import sys
import warnings

warnings.simplefilter("ignore")

import adbc_driver_flightsql.dbapi as flightsql  # noqa: E402
import pyarrow.flight as flight  # noqa: E402
from protowire import any_of, field  # noqa: E402

mode, port = sys.argv[1], sys.argv[2]
uri = f"grpc://127.0.0.1:{port}"
USER, PASSWORD = "analyst", "s3cret"


def adbc(user=USER, password=PASSWORD):
    return flightsql.connect(uri, db_kwargs={"username": user, "password": password})


def rows_of(table):
    cols = ["listing_id", "title", "price_last_eur", "last_price_at", "is_active", "days_online", "country"]
    out = []
    for r in table.select(cols).to_pylist():
        ts = r["last_price_at"]
        out.append([
            r["listing_id"],
            r["title"],
            None if r["price_last_eur"] is None else str(r["price_last_eur"]),
            None if ts is None else ts.isoformat(),
            r["is_active"],
            r["days_online"],
            r["country"],
        ])
    return sorted(out, key=lambda r: r[0])


def command(name, body=b""):
    """A Flight SQL command packed in google.protobuf.Any."""
    return any_of(f"type.googleapis.com/arrow.flight.protocol.sql.{name}", body)


def pyarrow_read(sql_or_cmd):
    client = flight.FlightClient(uri)
    header = client.authenticate_basic_token(USER.encode(), PASSWORD.encode())
    opts = flight.FlightCallOptions(headers=[header])
    info = client.get_flight_info(flight.FlightDescriptor.for_command(sql_or_cmd), opts)
    return client.do_get(info.endpoints[0].ticket, opts).read_all()


out = {}
if mode == "read":
    with adbc() as conn:
        cur = conn.cursor()
        cur.execute("SELECT * FROM ads_vw")
        t = cur.fetch_arrow_table()
        out["adbc_rows"] = rows_of(t)
        out["adbc_types"] = {f.name: str(f.type) for f in t.schema}
        cur.execute("SELECT count(*) AS n FROM ads_vw WHERE listing_id <= ? AND country = ?", parameters=(500, "DE"))
        out["prepared_count"] = cur.fetch_arrow_table().column("n")[0].as_py()
        objs = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        out["adbc_tables"] = sorted(
            f"{s['db_schema_name']}.{t['table_name']}"
            for c in objs for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]
        )
        try:
            cur.execute("SELECT no_such_column FROM ads_vw")
            out["bad_sql_error"] = None
        except Exception as e:  # noqa: BLE001
            out["bad_sql_error"] = str(e)
    query = command("CommandStatementQuery", field(1, b"SELECT * FROM gold.ads_vw"))
    out["pyarrow_rows"] = rows_of(pyarrow_read(query))
    tables = pyarrow_read(command("CommandGetTables")).to_pylist()
    out["pyarrow_tables"] = sorted(f"{t['db_schema_name']}.{t['table_name']}" for t in tables)
    try:
        with adbc(password="wrong") as conn:
            conn.cursor().execute("SELECT 1")
        out["wrong_password_error"] = None
    except Exception as e:  # noqa: BLE001
        out["wrong_password_error"] = str(e)
    try:
        client = flight.FlightClient(uri)
        client.get_flight_info(flight.FlightDescriptor.for_command(query))
        out["no_token_error"] = None
    except Exception as e:  # noqa: BLE001
        out["no_token_error"] = str(e)
elif mode == "title":
    with adbc() as conn:
        cur = conn.cursor()
        cur.execute("SELECT title, model FROM ads_vw WHERE listing_id = ?", parameters=(int(sys.argv[3]),))
        t = cur.fetch_arrow_table()
        out["title"] = t.column("title")[0].as_py()
        out["model"] = t.column("model")[0].as_py()
elif mode == "tls":
    certs = open(sys.argv[3], "rb").read()
    client = flight.FlightClient(f"grpc+tls://127.0.0.1:{port}", tls_root_certs=certs)
    header = client.authenticate_basic_token(USER.encode(), PASSWORD.encode())
    opts = flight.FlightCallOptions(headers=[header])
    query = command("CommandStatementQuery", field(1, b"SELECT count(*) AS n FROM ads_vw"))
    info = client.get_flight_info(flight.FlightDescriptor.for_command(query), opts)
    out["count"] = client.do_get(info.endpoints[0].ticket, opts).read_all().column("n")[0].as_py()
elif mode == "cancel":
    client = flight.FlightClient(uri)
    header = client.authenticate_basic_token(USER.encode(), PASSWORD.encode())
    opts = flight.FlightCallOptions(headers=[header])
    sql = b"SELECT a.listing_id, b.title FROM bronze.listings a CROSS JOIN bronze.listings b"
    info = client.get_flight_info(flight.FlightDescriptor.for_command(command("CommandStatementQuery", field(1, sql))), opts)
    reader = client.do_get(info.endpoints[0].ticket, opts)
    out["first_batch_rows"] = reader.read_chunk().data.num_rows
    reader.cancel()
elif mode == "memory":
    try:
        with adbc() as conn:
            cur = conn.cursor()
            cur.execute("SELECT * FROM bronze.price_log ORDER BY price, changed_at")
            out["rows"] = cur.fetch_arrow_table().num_rows
            out["memory_error"] = None
    except Exception as e:  # noqa: BLE001
        out["memory_error"] = str(e)

print(json.dumps(out))
sys.stdout.flush()
os._exit(0)
