"""Hand-encoded protobuf fields, for hot paths that extend already-serialized messages.

Protobuf parsing merges repeated occurrences of a message (for a singular scalar or message
field the last occurrence wins), so appending an encoded field to serialized bytes sets or
replaces that field without decoding and re-encoding the rest.
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer."""
    if value < 0x80:
        return _SMALL[value] if value >= 0 else _negative(value)
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x10000000:  # up to 4 bytes, unrolled: the common size of times and lengths
        if value < 0x200000:
            return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
        return bytes(
            (
                (value & 0x7F) | 0x80,
                ((value >> 7) & 0x7F) | 0x80,
                ((value >> 14) & 0x7F) | 0x80,
                value >> 21,
            )
        )
    out = []
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


def _negative(value: int) -> bytes:
    raise ValueError(f"a varint cannot hold {value}")


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
    return _TAGS[field] + _SMALL[len(body)] + body  # a Timestamp body is under 128 bytes


_TAGS = {field: varint(field << 3 | 2) for field in range(1, 16)}
