"""Deduplication by message id within a time window, in bounded memory, across restarts.

Ids are kept as 64-bit xxh3 hashes in two generations: the current one and the one before.
A generation turns over when it is a window old (or holds ``max_ids``, so a flood cannot grow
memory without bound), so an id is remembered for at least one window and at most two.
Ids of appends still in flight are *pending*: a concurrent duplicate is answered as one, and
if the append fails they are released so that the client's retry is not refused.

The generations are saved to a snapshot together with the log offsets they cover; on start-up
the snapshot is loaded and the event log replayed from those offsets, so nothing acknowledged
since the snapshot is forgotten.
"""

from __future__ import annotations

import json
import os
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import xxhash

SNAPSHOT_VERSION = 1


def fingerprint(message_id: str) -> int:
    """The 64-bit hash an id is remembered by."""
    return xxhash.xxh3_64_intdigest(message_id.encode())


class Deduplicator:
    """Remembers message ids for ``window_seconds``; see the module docstring."""

    def __init__(self, window_seconds: float, max_ids: int) -> None:
        self.window_seconds = window_seconds
        self.max_ids = max_ids
        self.current: set[int] = set()
        self.previous: set[int] = set()
        self.pending: set[int] = set()
        self.started = time.time()

    def _turn_over_if_due(self, now: float) -> None:
        if now - self.started >= self.window_seconds or len(self.current) >= self.max_ids:
            self.previous = self.current
            self.current = set()
            self.started = now

    def seen(self, key: int) -> bool:
        return key in self.current or key in self.previous or key in self.pending

    def claim(self, message_ids: Sequence[str]) -> tuple[list[bool], list[int]]:
        """For each id, whether it is new (then it becomes pending); and the pending hashes.

        An id twice in ``message_ids`` is new the first time only.
        """
        self._turn_over_if_due(time.time())
        fresh: list[bool] = []
        claimed: list[int] = []
        current, previous, pending = self.current, self.previous, self.pending
        for message_id in message_ids:
            key = xxhash.xxh3_64_intdigest(message_id.encode())
            if key in pending or key in current or key in previous:
                fresh.append(False)
            else:
                pending.add(key)
                claimed.append(key)
                fresh.append(True)
        return fresh, claimed

    def commit(self, keys: Iterable[int]) -> None:
        """The appends of ``keys`` are durable: remember them for the window."""
        for key in keys:
            self.pending.discard(key)
            self.current.add(key)

    def release(self, keys: Iterable[int]) -> None:
        """The appends of ``keys`` failed: forget them, so a retry is accepted."""
        for key in keys:
            self.pending.discard(key)

    def observe(self, message_ids: Iterable[str]) -> None:
        """Remember ids found in the log (start-up replay)."""
        for message_id in message_ids:
            self.current.add(xxhash.xxh3_64_intdigest(message_id.encode()))

    # -- snapshots ---------------------------------------------------------------------------

    def save(self, path: Path, offsets: Mapping[int, int]) -> None:
        """Write the committed ids and the log ``offsets`` they cover, atomically.

        ``offsets`` must be read before the ids are copied (ids committed in between are then
        replayed again on start-up, which is harmless).
        """
        current = array("Q", self.current)
        previous = array("Q", self.previous)
        header = {
            "version": SNAPSHOT_VERSION,
            "started": self.started,
            "window_seconds": self.window_seconds,
            "offsets": {str(p): o for p, o in offsets.items()},
            "current": len(current),
            "previous": len(previous),
        }
        temporary = path.with_suffix(".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("wb") as file:
            file.write(json.dumps(header).encode() + b"\n")
            current.tofile(file)
            previous.tofile(file)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)

    def load(self, path: Path) -> dict[int, int] | None:
        """Load a snapshot; the log offsets to replay from, or ``None`` without a usable one."""
        if not path.exists():
            return None
        try:
            with path.open("rb") as file:
                header = json.loads(file.readline())
                if header.get("version") != SNAPSHOT_VERSION:
                    return None
                current, previous = array("Q"), array("Q")
                current.fromfile(file, header["current"])
                previous.fromfile(file, header["previous"])
        except (OSError, ValueError, EOFError, KeyError):
            return None  # a damaged snapshot: rebuild from the log instead
        self.current = set(current)
        self.previous = set(previous)
        self.started = float(header["started"])
        return {int(p): int(o) for p, o in header["offsets"].items()}
