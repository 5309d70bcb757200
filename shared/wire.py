"""Hand-encoded protobuf fields, for hot paths that extend already-serialized messages.

Protobuf parsing merges repeated occurrences of a message (for a singular scalar or message
field the last occurrence wins), so appending an encoded field to serialized bytes sets or
replaces that field without decoding and re-encoding the rest.
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field: int, data: bytes) -> bytes:
    """Field ``field`` with wire type 2 (bytes, string or embedded message)."""
    return varint(field << 3 | 2) + varint(len(data)) + data


def string_field(field: int, text: str) -> bytes:
    """A string field."""
    return length_delimited(field, text.encode())


def varint_field(field: int, value: int) -> bytes:
    """An integer field with wire type 0."""
    return varint(field << 3) + varint(value)


def timestamp_field(field: int, nanoseconds: int) -> bytes:
    """A ``google.protobuf.Timestamp`` field holding ``nanoseconds`` since the epoch."""
    seconds, nanos = divmod(nanoseconds, 1_000_000_000)
    body = (b"\x08" + varint(seconds) if seconds else b"") + (
        b"\x10" + varint(nanos) if nanos else b""
    )
    return length_delimited(field, body)
