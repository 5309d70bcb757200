"""Unary round trips against a running service's health check, next to a bare grpc.aio server.

Starts ``profilemesh serve identity`` exactly as a user would (all interceptors, reflection,
health) and a bare grpc.aio echo server with no interceptors, both as subprocesses on free
localhost ports, then drives each with the same asyncio client: calls/s with many calls in
flight, and p50/p99 latency of one call at a time. The ratio says what the mesh's bootstrap
costs over bare gRPC.

    python bench/rpc.py [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, free_port, parse_args, percentile, wait_serving

ECHO_METHOD = "/bench.Echo/Echo"
IN_FLIGHT = 32


async def _serve_echo(port: int) -> None:
    """A bare grpc.aio server answering one method with its request bytes."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _measure(
    call: Callable[[], Awaitable[object]], calls: int, in_flight: int
) -> tuple[float, list[float]]:
    """Run ``calls`` calls with ``in_flight`` concurrent workers: (calls/s, latencies in ms)."""
    latencies: list[float] = []
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    return calls / elapsed, latencies


async def _bench(
    name: str,
    target: str,
    make_call: Callable[[grpc.aio.Channel], Callable[[], Awaitable[object]]],
    calls: int,
    report: dict[str, float],
) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = make_call(channel)
        await _measure(call, min(2000, calls // 5), IN_FLIGHT)  # warm up
        throughput, _ = await _measure(call, calls, IN_FLIGHT)
        _, latencies = await _measure(call, max(1000, calls // 5), 1)
    report[f"{name}_calls_per_s"] = throughput
    report[f"{name}_p50_ms"] = percentile(latencies, 50)
    report[f"{name}_p99_ms"] = percentile(latencies, 99)


def _health_call(channel: grpc.aio.Channel) -> Callable[[], Awaitable[object]]:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()
    return lambda: stub.Check(request)


def _echo_call(channel: grpc.aio.Channel) -> Callable[[], Awaitable[object]]:
    echo = channel.unary_unary(ECHO_METHOD)
    payload = health_pb2.HealthCheckResponse(status=1).SerializeToString()
    return lambda: echo(payload)


async def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    calls = 5_000 if args.quick else 30_000
    service_port, echo_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {
            **os.environ,
            "PROFILEMESH_DATA_DIR": data_dir,
            "PROFILEMESH_SERVICES__IDENTITY__PORT": str(service_port),
            "PROFILEMESH_LOG_LEVEL": "WARNING",
        }
        service = subprocess.Popen(
            [sys.executable, "-m", "profilemesh.services.cli", "serve", "identity"], env=env
        )
        echo = subprocess.Popen([sys.executable, __file__, "--echo-server", str(echo_port)])
        try:
            service_target, echo_target = f"127.0.0.1:{service_port}", f"127.0.0.1:{echo_port}"
            await wait_serving(service_target, service)
            report = Report("rpc")
            await _bench("service_health", service_target, _health_call, calls, report.figures)
            await _bench_echo_when_up(echo_target, calls, report)
        finally:
            for process in (service, echo):
                process.terminate()
                process.wait(timeout=30)
    report.ratios["throughput_vs_bare_grpc"] = (
        report.figures["service_health_calls_per_s"] / report.references["bare_echo_calls_per_s"]
    )
    report.target(
        "throughput_vs_bare_grpc",
        ">= 0.5 of bare grpc.aio",
        report.ratios["throughput_vs_bare_grpc"] >= 0.5,
    )
    report.target("p99_ms", "p99 <= 5 ms", report.figures["service_health_p99_ms"] <= 5.0)
    print(f"rpc: {calls:,} calls with {IN_FLIGHT} in flight; latency one call at a time")
    report.print()
    report.write(args.json)
    return 0


async def _bench_echo_when_up(target: str, calls: int, report: Report) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                await channel.unary_unary(ECHO_METHOD)(b"", timeout=0.5)
            break
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    await _bench("bare_echo", target, _echo_call, calls, report.references)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        asyncio.run(_serve_echo(int(sys.argv[2])))
    else:
        sys.exit(asyncio.run(main()))
