"""Protocol Buffers wire format by hand, for the Flight test clients (no generated code)."""


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, payload):
    """A length-delimited field (strings, bytes, messages)."""
    return varint((num << 3) | 2) + varint(len(payload)) + payload


def number(num, n):
    """A varint field (integers, booleans)."""
    return varint(num << 3) + varint(n)


def any_of(type_url, body):
    """A message packed in google.protobuf.Any."""
    return field(1, type_url.encode()) + field(2, body)
