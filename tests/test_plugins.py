"""Plugins: loading through entry points, isolation of failures, the conformance kit, the guide."""

from __future__ import annotations

import inspect
import json
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest
from pydantic import BaseModel

import profilemesh.testing
from profilemesh.plugins import inline_source, jsonl_file_activator
from profilemesh.plugins.inline_source import InlineSource
from profilemesh.plugins.jsonl_file_activator import JsonlFileActivator
from profilemesh.shared import hookspecs
from profilemesh.shared.errors import InvalidArgument, NotFound
from profilemesh.shared.extension_points import (
    Activator,
    Checkpoint,
    Delivery,
    DeliveryOutcome,
    DeliveryStatus,
    SourceBatch,
    SourceConnector,
)
from profilemesh.shared.hookspecs import hookimpl
from profilemesh.shared.plugin_manager import (
    PluginDescription,
    PluginFailure,
    create_plugin_manager,
)
from profilemesh.testing import (
    check_activator,
    check_activator_async,
    check_plugin,
    check_source_connector,
    sample_deliveries,
)

GUIDE = Path(__file__).resolve().parent.parent / "plugins" / "README.md"

EVENTS = [
    {"type": "track", "event": "Order Completed", "message_id": f"m{i}", "properties": {"n": i}}
    for i in range(7)
]
RECORDS = [{"email": f"p{i}@example.com", "name": f"Person {i}"} for i in range(5)]


# --- test plugins -------------------------------------------------------------------------


class EchoConfig(BaseModel):
    """No settings."""


class EchoActivator(Activator):
    """Reports everything delivered and sends nothing."""

    name = "echo"
    description = "Sends nothing."
    config_model = EchoConfig

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        return [DeliveryOutcome.delivered() for _ in deliveries]


def plugin_registering(*classes: object) -> object:
    """A plugin object whose register_activators hook registers ``classes``."""

    class Plugin:
        @hookimpl
        def register_activators(self, register: Callable[[object], None]) -> None:
            for cls in classes:
                register(cls)

    return Plugin()


class ExplodingPlugin:
    """Registers a connector, then raises: a plugin with a bug in its hook."""

    @hookimpl
    def register_sources(self, register: Callable[[type[SourceConnector]], None]) -> None:
        register(ConnectorFromTheExplodingPlugin)
        raise RuntimeError("boom")


class ConnectorFromTheExplodingPlugin(InlineSource):
    name = "exploding"


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Install a plugin as pip would: a module and a dist-info declaring its entry point."""
    modules: list[str] = []

    def install(entry_point: str, source: str, distribution: str = "profilemesh-test") -> str:
        module = f"pm_test_plugin_{uuid.uuid4().hex[:8]}"
        root = tmp_path / module
        dist_info = root / f"{distribution.replace('-', '_')}-1.0.dist-info"
        dist_info.mkdir(parents=True)
        (root / f"{module}.py").write_text(source)
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n"
        )
        (dist_info / "entry_points.txt").write_text(f"[profilemesh]\n{entry_point} = {module}\n")
        monkeypatch.syspath_prepend(str(root))
        modules.append(module)
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)


THIRD_PARTY_PLUGIN = """
from profilemesh.shared.hookspecs import hookimpl
from profilemesh.plugins.inline_source import InlineSource


class ThirdPartySource(InlineSource):
    name = "third_party"


@hookimpl
def register_sources(register):
    register(ThirdPartySource)
"""


# --- loading ------------------------------------------------------------------------------


def test_entry_points_load_the_two_built_in_plugins() -> None:
    plugins = create_plugin_manager()

    assert plugins.source_connectors()["inline"] is InlineSource
    assert plugins.activators()["jsonl_file"] is JsonlFileActivator
    assert plugins.failures == []
    rows = plugins.describe()
    assert PluginDescription("inline_source", "source", ("inline",), None) in rows
    assert PluginDescription("jsonl_file_activator", "activator", ("jsonl_file",), None) in rows


def test_each_plugin_set_is_independent() -> None:
    first = create_plugin_manager(load_entry_points=False)
    first.register(plugin_registering(EchoActivator), name="echo")

    assert "echo" in first.activators()
    assert "echo" not in create_plugin_manager().activators()


def test_a_plugin_installed_by_another_package_is_loaded_through_its_entry_point(
    install_plugin: Any,
) -> None:
    install_plugin("third_party", THIRD_PARTY_PLUGIN)

    plugins = create_plugin_manager()

    assert plugins.source_connectors()["third_party"].__name__ == "ThirdPartySource"
    assert "inline" in plugins.source_connectors()


@pytest.mark.parametrize("disabled", ["inline_source", "Inline-Source"])
def test_a_disabled_plugin_is_not_loaded(disabled: str) -> None:
    plugins = create_plugin_manager(disabled=[disabled])

    assert "inline" not in plugins.source_connectors()
    assert "jsonl_file" in plugins.activators()
    assert plugins.skipped == ["inline_source"]
    assert "inline_source" not in [row.plugin for row in plugins.describe()]


def test_disabling_a_distribution_disables_every_plugin_it_declares(install_plugin: Any) -> None:
    install_plugin("third_party", THIRD_PARTY_PLUGIN, distribution="profilemesh-extras")

    plugins = create_plugin_manager(disabled=["profilemesh_extras"])

    assert "third_party" not in plugins.source_connectors()
    assert "inline" in plugins.source_connectors()


def test_a_disabled_name_is_not_registered_programmatically_either() -> None:
    plugins = create_plugin_manager(disabled=["echo"], load_entry_points=False)

    assert plugins.register(plugin_registering(EchoActivator), name="echo") is None
    assert plugins.activators() == {}


# --- validation ---------------------------------------------------------------------------


def test_an_unknown_hook_implementation_raises_plugin_validation_error() -> None:
    class Misspelt:
        @hookimpl
        def register_sauces(self, register: object) -> None:
            """A typo that would otherwise be silently ignored."""

    plugins = create_plugin_manager(load_entry_points=False)

    with pytest.raises(pluggy.PluginValidationError, match="register_sauces"):
        plugins.register(Misspelt(), name="misspelt")
    assert plugins.describe() == []


def test_a_hook_parameter_the_spec_does_not_have_raises_plugin_validation_error() -> None:
    class WrongParameter:
        @hookimpl
        def register_sources(self, registrar: object) -> None:
            """``registrar`` is not a parameter of the spec."""

    with pytest.raises(pluggy.PluginValidationError, match="registrar"):
        create_plugin_manager(load_entry_points=False).register(WrongParameter())


def test_an_installed_plugin_with_an_unknown_hook_stops_loading(install_plugin: Any) -> None:
    install_plugin(
        "misspelt",
        "from profilemesh.shared.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_activator(register):\n    pass\n",
    )

    with pytest.raises(pluggy.PluginValidationError, match="register_activator"):
        create_plugin_manager()


# --- isolation ----------------------------------------------------------------------------


def test_a_plugin_whose_hook_raises_is_isolated_and_reported() -> None:
    plugins = create_plugin_manager()
    plugins.register(ExplodingPlugin(), name="exploding_plugin")

    connectors = plugins.source_connectors()

    assert "inline" in connectors, "the other plugins still register"
    assert "exploding" not in connectors, "nothing of the failing hook call is kept"
    assert plugins.failures == [
        PluginFailure("exploding_plugin", "register_sources", "RuntimeError: boom")
    ]
    assert (
        PluginDescription("exploding_plugin", "source", (), "RuntimeError: boom")
        in plugins.describe()
    )


def test_a_plugin_whose_import_fails_is_isolated_and_reported(install_plugin: Any) -> None:
    install_plugin("broken_import", "import a_module_that_is_not_installed\n")

    plugins = create_plugin_manager()

    assert "inline" in plugins.source_connectors()
    [failure] = plugins.failures
    assert (failure.plugin, failure.stage) == ("broken_import", "load")
    assert "ModuleNotFoundError" in failure.error
    assert any(row.plugin == "broken_import" and row.failure for row in plugins.describe())


def test_a_duplicate_name_is_rejected_and_the_first_registration_kept() -> None:
    class AnotherInline(InlineSource):
        pass  # inherits the name "inline"

    plugins = create_plugin_manager()
    plugins.register(
        type(
            "Copycat", (), {"register_sources": hookimpl(lambda register: register(AnotherInline))}
        )
    )

    assert plugins.source_connectors()["inline"] is InlineSource
    [failure] = plugins.failures
    assert failure.plugin == "Copycat"
    assert "'inline'" in failure.error and "inline_source" in failure.error


class Abstract(Activator):
    name = "abstract"
    description = "Lacks deliver."
    config_model = EchoConfig


class BadName(EchoActivator):
    name = "Bad Name"


class NoConfigModel(EchoActivator):
    config_model: ClassVar[Any] = dict


@pytest.mark.parametrize(
    ("registered", "problem"),
    [
        (EchoActivator(EchoConfig()), "not a subclass of Activator"),
        (InlineSource, "not a subclass of Activator"),
        (Abstract, "abstract"),
        (BadName, "lower_snake_case"),
        (NoConfigModel, "config_model"),
    ],
    ids=["an instance", "a connector", "an abstract class", "a bad name", "no config model"],
)
def test_a_registration_that_is_not_a_valid_activator_class_is_rejected(
    registered: object, problem: str
) -> None:
    plugins = create_plugin_manager(load_entry_points=False)
    plugins.register(plugin_registering(EchoActivator, registered), name="sloppy")

    assert plugins.activators() == {}, "a plugin's registrations are all or nothing"
    [failure] = plugins.failures
    assert failure.plugin == "sloppy" and problem in failure.error


def test_looking_up_an_unknown_connector_names_the_installed_ones() -> None:
    plugins = create_plugin_manager()

    assert plugins.source_connector("inline") is InlineSource
    with pytest.raises(NotFound, match="installed: csv, inline, jsonl, parquet, postgres"):
        plugins.source_connector("salesforce")


# --- built-in plugins ---------------------------------------------------------------------


def test_an_invalid_config_is_invalid_argument_naming_each_field() -> None:
    with pytest.raises(InvalidArgument) as raised:
        InlineSource({"items": [{"ok": 1}, "not an object"], "batch_size": 0, "bach_size": 2})

    assert {v.field for v in raised.value.violations} == {
        "config.items[1]",
        "config.batch_size",
        "config.bach_size",
    }


def test_the_inline_source_rejects_a_corrupt_checkpoint() -> None:
    source = InlineSource({"items": RECORDS, "kind": "records"})

    with pytest.raises(InvalidArgument) as raised:
        list(source.read({"next_index": 99}))
    assert raised.value.violations[0].field == "checkpoint.next_index"


def test_the_jsonl_file_activator_writes_each_key_once_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "out" / "deliveries.jsonl"
    deliveries = sample_deliveries(3)

    check_activator(JsonlFileActivator, {"path": str(path)}, lambda: deliveries)

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["idempotency_key"] for line in lines] == [d.idempotency_key for d in deliveries]
    assert lines[0]["fields"] == deliveries[0].fields
    assert lines[0]["occurred_at"] == "2025-01-01T00:00:00+00:00"


async def test_the_jsonl_file_activator_fails_only_the_delivery_that_is_not_json(
    tmp_path: Path,
) -> None:
    good, bad = sample_deliveries(2)
    bad = Delivery(**{**_fields_of(bad), "fields": {"when": datetime.now(UTC)}})
    activator = JsonlFileActivator({"path": str(tmp_path / "out.jsonl")})

    outcomes = await activator.deliver([good, bad])

    assert [o.status for o in outcomes] == [DeliveryStatus.DELIVERED, DeliveryStatus.PERMANENT]


async def test_the_jsonl_file_activator_reports_an_unwritable_file_as_retryable(
    tmp_path: Path,
) -> None:
    activator = JsonlFileActivator({"path": str(tmp_path)})  # a directory

    outcomes = await activator.deliver(sample_deliveries(2))

    assert [o.status for o in outcomes] == [DeliveryStatus.RETRYABLE] * 2
    assert outcomes[0].error and str(tmp_path) in outcomes[0].error


def _fields_of(delivery: Delivery) -> dict[str, Any]:
    return {name: getattr(delivery, name) for name in Delivery.__dataclass_fields__}


# --- the conformance kit ------------------------------------------------------------------


@pytest.mark.parametrize("module", [inline_source, jsonl_file_activator])
def test_the_conformance_kit_passes_the_built_in_plugins(module: object) -> None:
    [row] = check_plugin(module)
    assert row.names and row.failure is None


@pytest.mark.parametrize(("kind", "items"), [("events", EVENTS), ("records", RECORDS)])
def test_the_conformance_kit_passes_the_inline_source(kind: str, items: list[Any]) -> None:
    read = check_source_connector(
        InlineSource,
        {"kind": kind, "items": items, "batch_size": 2},
        bad_config={"items": items, "batch_size": -1},
        expect_items=len(items),
    )
    assert read == items


async def test_the_conformance_kit_passes_the_jsonl_file_activator(tmp_path: Path) -> None:
    await check_activator_async(
        JsonlFileActivator, {"path": str(tmp_path / "out.jsonl")}, bad_config={"path": None}
    )


class ResumesOneItemLate(InlineSource):
    """Its checkpoints point one item too far: a restart loses an item."""

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        for batch in super().read(checkpoint):
            index = batch.checkpoint["next_index"]
            assert isinstance(index, int)
            late = {"next_index": min(index + 1, len(self.config.items))}
            yield SourceBatch(batch.kind, batch.items, late)


class ResumesAtBatchStart(InlineSource):
    """Its checkpoints point at the start of the batch: a restart reads the batch again."""

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        for batch in super().read(checkpoint):
            index = batch.checkpoint["next_index"]
            assert isinstance(index, int)
            yield SourceBatch(batch.kind, batch.items, {"next_index": index - len(batch.items)})


class IgnoresCheckpoints(InlineSource):
    """Always reads from the beginning."""

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        return super().read(None)


@pytest.mark.parametrize(
    ("connector", "problem"),
    [
        (ResumesOneItemLate, "lost 1 item"),
        (ResumesAtBatchStart, "duplicates"),
        (IgnoresCheckpoints, "duplicates"),
    ],
)
def test_the_conformance_kit_fails_a_connector_that_does_not_resume_exactly(
    connector: type[SourceConnector], problem: str
) -> None:
    with pytest.raises(AssertionError, match=problem):
        check_source_connector(connector, {"items": EVENTS, "batch_size": 3})


def test_the_conformance_kit_fails_a_connector_that_accepts_a_bad_config() -> None:
    with pytest.raises(AssertionError, match="accepted bad_config"):
        check_source_connector(
            InlineSource, {"items": EVENTS, "batch_size": 3}, bad_config={"items": EVENTS}
        )


def test_the_conformance_kit_fails_a_connector_whose_items_are_not_json() -> None:
    class YieldsDates(InlineSource):
        def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
            # The very mistake under test, so the type checker objects too.
            yield SourceBatch("events", [{"at": datetime.now(UTC)}], {"next_index": 1})  # type: ignore[dict-item]

    with pytest.raises(AssertionError, match="not JSON"):
        check_source_connector(YieldsDates, {"items": EVENTS})


class RejectsRepeats(EchoActivator):
    """Treats a retried delivery as an error: not idempotent."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.seen: set[str] = set()

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        outcomes = []
        for delivery in deliveries:
            repeated = delivery.idempotency_key in self.seen
            self.seen.add(delivery.idempotency_key)
            outcomes.append(
                DeliveryOutcome.permanent("duplicate") if repeated else DeliveryOutcome.delivered()
            )
        return outcomes


class DropsTheLastOutcome(EchoActivator):
    """Returns one outcome too few."""

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        return (await super().deliver(deliveries))[:-1]


@pytest.mark.parametrize(
    ("activator", "problem"),
    [
        (RejectsRepeats, "permanent \\(duplicate\\), expected delivered"),
        (DropsTheLastOutcome, "returned 1 outcome\\(s\\); expected a list of 2"),
    ],
)
async def test_the_conformance_kit_fails_an_activator_that_breaks_the_contract(
    activator: type[Activator], problem: str
) -> None:
    with pytest.raises(AssertionError, match=problem):
        await check_activator_async(activator, {})


def test_the_conformance_kit_fails_a_plugin_that_registers_nothing() -> None:
    class Idle:
        @hookimpl
        def register_sources(self) -> None:
            """Registers nothing."""

    with pytest.raises(AssertionError, match="registers no source"):
        check_plugin(Idle())


def test_the_conformance_kit_fails_a_plugin_with_an_unknown_hook() -> None:
    class Misspelt:
        @hookimpl
        def register_source(self, register: object) -> None:
            """Singular: not a hook."""

    with pytest.raises(AssertionError, match="register_source"):
        check_plugin(Misspelt())


# --- the plugin author's guide ------------------------------------------------------------


def _call_text(function: Callable[..., object]) -> str:
    """``name(a, b)``: how the guide must show a hook or method, with its parameters."""
    parameters = [p for p in inspect.signature(function).parameters if p != "self"]
    return f"{function.__name__}({', '.join(parameters)})"


def _documented_surface() -> list[str]:
    surface = [
        _call_text(function)
        for _, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, f"{hookspecs.PROJECT_NAME}_spec")
    ]
    for base in (SourceConnector, Activator):
        surface += [f"`{attribute}`" for attribute in base.__annotations__]
        surface += [
            _call_text(method)
            for name, method in inspect.getmembers(base, inspect.isfunction)
            if not name.startswith("_") or name == "__init__"
        ]
    surface += [f"`{name}(" for name in profilemesh.testing.__all__]
    return sorted(set(surface))


def test_the_guide_covers_both_hooks_and_every_method() -> None:
    surface = _documented_surface()

    assert {"register_sources(register)", "register_activators(register)"} <= set(surface)
    assert {"read(checkpoint)", "deliver(deliveries)", "check()", "close()"} <= set(surface)


@pytest.mark.parametrize("text", _documented_surface())
def test_every_hook_method_and_check_is_in_the_plugin_guide(text: str) -> None:
    assert text in GUIDE.read_text(), f"plugins/README.md does not document {text}"
