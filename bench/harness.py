"""What every benchmark shares: the ``--quick``/``--json`` convention, free ports, percentiles.

``python bench/NAME.py [--quick] [--json PATH]``: ``--quick`` runs the same code paths on
smaller sizes in under a minute; ``--json`` writes every printed figure as
``{"bench", "figures", "references", "ratios", "targets", "met"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Benchmarks measure the data path of a local development mesh and call it without tokens:
# auth is off, for them and for the services they start (which inherit the environment).
os.environ.setdefault("PROFILEMESH_AUTH__ENABLED", "false")


def parse_args(description: str) -> argparse.Namespace:
    """The two flags every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    return parser.parse_args()


def free_port() -> int:
    """A localhost TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_serving(
    target: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 60.0
) -> None:
    """Return once the server at ``target`` reports SERVING; fail early if ``process`` (the
    server, started by the benchmark) exits, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the service exited with {process.returncode}")
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} not serving after {timeout}s")
            await asyncio.sleep(0.1)


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, interpolated."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=1000, method="inclusive")[round(q * 10) - 1]


@dataclass
class Report:
    """Figures, references measured in the same run, their ratios, and targets."""

    bench: str
    figures: dict[str, float] = field(default_factory=dict)
    references: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    met: dict[str, bool] = field(default_factory=dict)

    def target(self, name: str, description: str, met: bool) -> None:
        """Record a target (``description`` says what it is) and whether it was met."""
        self.targets[name] = description
        self.met[name] = met

    def print(self) -> None:
        """Print every figure, reference, ratio and target."""
        for title, values in (
            ("figures", self.figures),
            ("references", self.references),
            ("ratios", self.ratios),
        ):
            print(f"{title}:")
            for key, value in values.items():
                print(f"  {key:<40} {value:,.3f}")
        print("targets:")
        for key, description in self.targets.items():
            print(f"  {key:<40} {description:<28} {'met' if self.met[key] else 'NOT MET'}")

    def write(self, path: Path | None) -> None:
        """Write the report as JSON to ``path`` (if given)."""
        if path is None:
            return
        document = {
            "bench": self.bench,
            "figures": self.figures,
            "references": self.references,
            "ratios": self.ratios,
            "targets": self.targets,
            "met": all(self.met.values()),
            "met_by_target": self.met,
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
