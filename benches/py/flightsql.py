"""Flight SQL over plain pyarrow.flight, for the bench scripts: a statement query is a
CommandStatementQuery in a protobuf Any, built by hand (no protobuf dependency)."""
import pyarrow.flight as flight


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


def connect(port, user, password):
    """A function running one SQL statement against `weir serve` on 127.0.0.1:PORT (basic
    auth), each call a full round trip: GetFlightInfo + DoGet, the result as an Arrow table."""
    client = flight.FlightClient(f"grpc://127.0.0.1:{port}")
    opts = flight.FlightCallOptions(headers=[client.authenticate_basic_token(user.encode(), password.encode())])

    def read(sql):
        info = client.get_flight_info(flight.FlightDescriptor.for_command(statement(sql)), opts)
        return client.do_get(info.endpoints[0].ticket, opts).read_all()

    return read
