"""Settings come from PROFILEMESH_* and standard OTEL_* variables, typed and checked."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from profilemesh.shared.channel import service_config
from profilemesh.shared.json_logging import JsonFormatter
from profilemesh.shared.settings import SERVICE_NAMES, Settings


def test_nested_service_endpoints_and_lists_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROFILEMESH_SERVICES__IDENTITY__PORT", "6002")
    monkeypatch.setenv("PROFILEMESH_SERVICES__IDENTITY__HOST", "identity.mesh.svc")
    monkeypatch.setenv("PROFILEMESH_DISABLED_PLUGINS", "jsonl_file, inline ")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    settings = Settings()
    assert settings.services.identity.target == "identity.mesh.svc:6002"
    assert settings.services.ingestion.port == 50051
    assert settings.disabled_plugins == ["jsonl_file", "inline"]
    assert settings.traces_exporter == "console"


def test_bad_values_are_rejected_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILEMESH_SERVICES__FEATURES__PORT", "99999")
    with pytest.raises(ValidationError, match=r"services\.features\.port"):
        Settings()


def test_settings_survive_the_trip_to_a_child_process(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(disabled_plugins=["a"], grace_seconds=1.5)
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


def test_service_config_sets_deadline_and_retries_unavailable() -> None:
    config = json.loads(service_config(Settings().client, ["profilemesh.common.v1.LogService"]))
    streaming, default = config["methodConfig"]
    assert "timeout" not in streaming
    assert streaming["name"] == [{"service": "profilemesh.common.v1.LogService"}]
    assert default["timeout"] == "10.0s"
    assert default["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_json_log_lines_carry_extras_and_exceptions() -> None:
    record = logging.LogRecord("svc", logging.ERROR, __file__, 1, "failed %s", ("x",), None)
    record.port = 50051
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter("identity").format(record))
    assert line["message"] == "failed x"
    assert line["service"] == "identity"
    assert line["port"] == 50051
    assert "ValueError: boom" in line["exception"]


def test_every_service_has_its_own_data_directory() -> None:
    settings = Settings(data_dir="/var/lib/profilemesh")
    folders = {settings.service_data_dir(name) for name in SERVICE_NAMES}
    assert len(folders) == len(SERVICE_NAMES)
