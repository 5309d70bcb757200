"""`profilemesh import` as a user runs it: a CSV of customer rows into a running service."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.shared.settings import Settings
from tests.running_service import RunningIngestion


async def test_import_runs_a_connector_shows_progress_and_resumes_without_duplicates(
    mesh_settings: Settings, mesh_env: dict[str, str], tmp_path: Path
) -> None:
    rows = tmp_path / "crm.csv"
    lines = ["id,first_name,last_name,email"]
    lines += [f"c{i},Ada{i},Lovelace,ada{i}@example.com" for i in range(300)]
    lines.append(",Nobody,Noid,none@example.com")  # no record id: rejected with a reason
    rows.write_text("\n".join(lines) + "\n")
    service = await RunningIngestion(mesh_settings).start()
    env = {**mesh_env, "PROFILEMESH_SERVICES__INGESTION__PORT": str(service.port)}
    command = [
        sys.executable, "-m", "profilemesh.services.cli", "import", "crm",
        "--connector", "csv", "--config", f"path={rows}", "--config", "kind=records",
        "--config", "mapping.record_id=id", "--config", 'mapping.identifiers={"email": "email"}',
        "--config", "batch_size=50",
    ]  # fmt: skip
    try:
        first = await asyncio.to_thread(
            subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
        )
        second = await asyncio.to_thread(
            subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
        )
        stored = []
        for partition in await service.log.offsets():
            async for batch in service.log.subscribe(partition.partition, 0, stop_at_end=True):
                stored.extend(
                    event_log_pb2.IngestedItem.FromString(p) for p in batch.payload_list()
                )
    finally:
        await service.stop()
    assert first.returncode == 0, first.stdout + first.stderr
    assert "accepted 300" in first.stdout and "rejected 1" in first.stdout
    assert "record_id" in first.stdout  # the first rejection's reason is shown
    assert second.returncode == 0, second.stdout + second.stderr
    assert "accepted 0" in second.stdout  # resumed at the end: nothing read twice
    assert len(stored) == 300
    assert {item.record.record_id for item in stored} == {f"c{i}" for i in range(300)}
    assert all(item.record.source == "crm" for item in stored)


def test_import_against_a_service_that_is_down_is_one_clear_line(
    mesh_env: dict[str, str], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "profilemesh.services.cli", "import", "crm",
         "--connector", "csv", "--config", f"path={tmp_path / 'x.csv'}"],
        env=mesh_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len((result.stderr + result.stdout).strip().splitlines()) == 1
