"""Random ids drawn from the seeded generator: UUIDs, hexadecimal device ids, unique numbers.

Python's ``uuid.uuid4`` reads the operating system's entropy and could never be replayed; these
come from the same numpy generator as everything else, so a seed gives the same ids every time.
"""

from __future__ import annotations

import numpy as np


def uuids(rng: np.random.Generator, count: int, *, upper: bool = False) -> list[str]:
    """``count`` random (version 4, RFC 9562 variant) UUIDs, lower case unless ``upper`` (iOS
    writes its vendor ids in upper case)."""
    octets = np.frombuffer(rng.bytes(16 * count), dtype=np.uint8).reshape(count, 16).copy()
    octets[:, 6] = (octets[:, 6] & 0x0F) | 0x40  # version 4
    octets[:, 8] = (octets[:, 8] & 0x3F) | 0x80  # variant 10xx
    digits = octets.tobytes().hex()
    if upper:
        digits = digits.upper()
    return [
        f"{digits[i : i + 8]}-{digits[i + 8 : i + 12]}-{digits[i + 12 : i + 16]}-"
        f"{digits[i + 16 : i + 20]}-{digits[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


def hex_ids(rng: np.random.Generator, count: int, length: int = 16) -> list[str]:
    """``count`` ids of ``length`` lower-case hex digits (Android's device ids look so)."""
    digits = rng.bytes((length + 1) // 2 * count).hex()
    step = (length + 1) // 2 * 2
    return [digits[i : i + length] for i in range(0, step * count, step)]


def unique_numbers(rng: np.random.Generator, count: int, low: int, high: int) -> list[int]:
    """``count`` distinct integers in ``[low, high)``, in random order."""
    if high - low < count:
        raise ValueError(f"cannot draw {count} distinct numbers from [{low}, {high})")
    numbers = rng.choice(high - low, size=count, replace=False) + low
    return [int(n) for n in numbers]
