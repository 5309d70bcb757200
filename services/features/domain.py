"""The features domain: the service's state and rules, with no gRPC in sight.

Empty for now: each RPC's behaviour lands here as it is built, and the servicer stays a thin
translation between protobuf and these objects.
"""

from __future__ import annotations

from pathlib import Path


class Features:
    """The features service's domain state, kept under its own data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
