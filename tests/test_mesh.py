"""`profilemesh up`, `serve` and `status` as a user runs them: real processes, real sockets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from profilemesh.shared.settings import SERVICE_NAMES, Settings
from tests.conftest import port_is_free

SERVICE_PACKAGES = {
    "ingestion": "profilemesh.ingestion.v1.IngestionService",
    "identity": "profilemesh.identity.v1.IdentityService",
    "features": "profilemesh.features.v1.FeaturesService",
    "scoring": "profilemesh.scoring.v1.ScoringService",
    "activation": "profilemesh.activation.v1.ActivationService",
}


def _profilemesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "profilemesh.services.cli", *args]


class RunningMesh:
    """A `profilemesh up` subprocess and what it printed once ready."""

    def __init__(self, process: subprocess.Popen[str], pids: dict[str, int]) -> None:
        self.process = process
        self.pids = pids


def _start_up(env: dict[str, str], data_dir: Path) -> RunningMesh:
    process = subprocess.Popen(
        _profilemesh("up", "--data-dir", str(data_dir)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    for line in process.stdout:
        lines.append(line)
        if "Press Ctrl-C" in line or time.monotonic() > deadline:
            break
    output = "".join(lines)
    assert "Press Ctrl-C" in output, output
    pids = {m[0]: int(m[1]) for m in re.findall(r"^\s+(\w+)\s+\S+\s+pid (\d+)", output, re.M)}
    assert set(pids) == set(SERVICE_NAMES), output
    return RunningMesh(process, pids)


@pytest.fixture
def running_mesh(mesh_env: dict[str, str], mesh_settings: Settings) -> Iterator[RunningMesh]:
    mesh = _start_up(mesh_env, mesh_settings.data_dir)
    yield mesh
    if mesh.process.poll() is None:
        mesh.process.kill()
        mesh.process.wait()
    for pid in mesh.pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped; /proc tells them apart.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_until(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _reflected_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        for response in stub.ServerReflectionInfo(iter([request]), timeout=5):
            return {service.name for service in response.list_services_response.service}
    raise AssertionError("no reflection answer")


def test_up_serves_all_five_and_sigterm_stops_every_child(
    running_mesh: RunningMesh, mesh_settings: Settings
) -> None:
    for name in SERVICE_NAMES:
        target = mesh_settings.services.of(name).target
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_PACKAGES[name]):
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        listed = _reflected_services(target)
        assert {
            SERVICE_PACKAGES[name],
            "profilemesh.common.v1.LogService",
            "grpc.health.v1.Health",
        } <= listed

    running_mesh.process.send_signal(signal.SIGTERM)
    assert running_mesh.process.wait(timeout=30) == 0
    for name, pid in running_mesh.pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) outlived `profilemesh up`"
    for name in SERVICE_NAMES:
        port = mesh_settings.services.of(name).port
        assert port_is_free(port), f"{name}'s port {port} is still bound"


def test_status_reports_every_service(running_mesh: RunningMesh, mesh_env: dict[str, str]) -> None:
    result = subprocess.run(
        _profilemesh("status"), env=mesh_env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in SERVICE_NAMES:
        assert re.search(rf"^{name}\s+\S+\s+SERVING$", result.stdout, re.M), result.stdout


def test_status_fails_when_the_mesh_is_down(mesh_env: dict[str, str]) -> None:
    result = subprocess.run(
        _profilemesh("status", "--timeout", "0.3"),
        env=mesh_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stdout.count("UNREACHABLE") == len(SERVICE_NAMES)


def test_children_stop_when_the_supervisor_is_killed(running_mesh: RunningMesh) -> None:
    running_mesh.process.send_signal(signal.SIGKILL)
    running_mesh.process.wait(timeout=10)
    for name, pid in running_mesh.pids.items():
        assert _wait_until(lambda pid=pid: not _alive(pid), 15), f"{name} was orphaned"


def test_up_stops_the_mesh_when_a_service_dies(running_mesh: RunningMesh) -> None:
    os.kill(running_mesh.pids["features"], signal.SIGKILL)
    assert running_mesh.process.wait(timeout=30) == 1
    for name, pid in running_mesh.pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) outlived the failed mesh"


def test_serve_on_a_taken_port_exits_with_a_clear_error(
    running_mesh: RunningMesh, mesh_env: dict[str, str]
) -> None:
    result = subprocess.run(
        _profilemesh("serve", "identity"),
        env={**mesh_env, "PROFILEMESH_LOG_FORMAT": "text"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot listen on" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_stops_gracefully_on_sigterm(
    mesh_env: dict[str, str], mesh_settings: Settings
) -> None:
    process = subprocess.Popen(
        _profilemesh("serve", "scoring"), env=mesh_env, stderr=subprocess.PIPE, text=True
    )
    target = mesh_settings.services.scoring.target
    try:

        def serving() -> bool:
            with grpc.insecure_channel(target) as channel:
                try:
                    answer = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=0.5
                    )
                except grpc.RpcError:
                    return False
                return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

        assert _wait_until(serving, 30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        _, stderr = process.communicate()
        assert '"message": "stopping"' in stderr
        assert port_is_free(mesh_settings.services.scoring.port)
    finally:
        if process.poll() is None:
            process.kill()
