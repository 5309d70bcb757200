"""The conformance kit: checks a plugin author runs in their own test suite.

Published as :mod:`profilemesh.testing`. Each check exercises a plugin the way the services will
(fresh instances, checkpoints after a JSON round trip, retried deliveries) and raises
``AssertionError`` saying what broke the contract; it uses no test framework, so it works under
pytest, unittest or a plain script.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pluggy
from pydantic import BaseModel

from profilemesh.shared.errors import InvalidArgument
from profilemesh.shared.extension_points import (
    Activator,
    BatchKind,
    Checkpoint,
    Delivery,
    DeliveryOutcome,
    DeliveryStatus,
    JSONObject,
    SourceBatch,
    SourceConnector,
    Transition,
)
from profilemesh.shared.plugin_manager import (
    PluginDescription,
    PluginRegistrationError,
    create_plugin_manager,
    validate_registration,
)

Config = Mapping[str, object] | BaseModel


def check_plugin(plugin: object) -> list[PluginDescription]:
    """Check that ``plugin`` (a module or object) matches the hook specs and registers validly.

    Registers it alone in a fresh plugin set and calls its hooks. Fails if a hook name or
    parameter is unknown, if a hook raises or registers an invalid class or the same name twice,
    or if the plugin implements no hook or registers nothing. Returns what it registered.
    """
    plugins = create_plugin_manager(load_entry_points=False)
    try:
        plugins.register(plugin)
    except pluggy.PluginValidationError as error:
        raise AssertionError(
            f"{plugin!r} does not match the profilemesh hook specs: {error}"
        ) from error
    rows = plugins.describe()
    problems = [f"{row.kind} hook: {row.failure}" for row in rows if row.failure]
    if problems:
        raise AssertionError(f"{plugin!r} failed: " + "; ".join(problems))
    if all(row.kind is None for row in rows):
        raise AssertionError(
            f"{plugin!r} implements no profilemesh hook: decorate functions named after a hook "
            "(register_sources, register_activators) with profilemesh.shared.hookspecs.hookimpl"
        )
    empty = [row.kind for row in rows if row.kind is not None and not row.names]
    if empty:
        raise AssertionError(f"{plugin!r} implements a hook but registers no {empty[0]}")
    return rows


def check_source_connector(
    cls: type[SourceConnector],
    config: Config,
    *,
    bad_config: Config | None = None,
    expect_items: int | None = None,
) -> list[JSONObject]:
    """Check a source connector reads everything once and resumes exactly from its checkpoints.

    Reads the whole source from scratch with ``config`` (which must yield at least two
    batches), then, for the checkpoints after the first, middle and last batch, passes the
    checkpoint through JSON to a new instance and checks that it reads exactly the items that
    follow, in order: none again, none lost. With ``expect_items``, checks the item count; with
    ``bad_config``, checks that configuration is rejected with ``InvalidArgument`` naming the
    fields. Returns the items read.
    """
    _check_class(cls, SourceConnector)
    if bad_config is not None:
        _check_rejects(cls, bad_config)
    batches = _read_all(cls, config, None)
    items = [_canonical(item) for batch in batches for item in batch.items]
    if expect_items is not None and len(items) != expect_items:
        raise AssertionError(
            f"{cls.name} read {len(items)} item(s) from scratch; expected {expect_items}"
        )
    if len(batches) < 2:
        raise AssertionError(
            f"{cls.name} yielded {len(batches)} batch(es); resuming can only be checked with at "
            "least two: use a configuration with more items or a smaller batch size"
        )
    for position in sorted({0, len(batches) // 2, len(batches) - 1}):
        checkpoint = batches[position].checkpoint
        consumed = sum(len(batch.items) for batch in batches[: position + 1])
        resumed = _read_all(cls, config, json.loads(json.dumps(checkpoint)))
        _check_resumed(
            f"{cls.name} resumed from the checkpoint after batch {position + 1} of "
            f"{len(batches)} ({json.dumps(checkpoint)})",
            before=items[:consumed],
            expected=items[consumed:],
            got=[_canonical(item) for batch in resumed for item in batch.items],
        )
    return [item for batch in batches for item in batch.items]


def sample_deliveries(count: int = 4) -> list[Delivery]:
    """``count`` varied deliveries with idempotency keys unique to this call."""
    run = uuid.uuid4().hex[:12]
    start = datetime(2025, 1, 1, tzinfo=UTC)
    transitions: tuple[Transition, ...] = get_args(Transition)
    return [
        Delivery(
            idempotency_key=f"conformance-{run}-{index}",
            profile_id=f"profile-{index}",
            segment_id="conformance-segment",
            transition=transitions[index % len(transitions)],
            fields={
                "email": f"person{index}@example.com",
                "orders_90d": index,
                "churn_score": index / (count + 1),
                "vip": index % 2 == 0,
                "tags": ["conformance", f"n{index}"],
                "address": {"country": "NL", "city": None},
            },
            occurred_at=start + timedelta(minutes=index),
        )
        for index in range(count)
    ]


async def check_activator_async(
    cls: type[Activator],
    config: Config,
    make_deliveries: Callable[[], Sequence[Delivery]] = sample_deliveries,
    *,
    bad_config: Config | None = None,
    expected_statuses: Sequence[DeliveryStatus] | None = None,
) -> None:
    """Check an activator reports one outcome per delivery, in order, and is idempotent.

    ``make_deliveries()`` gives at least two deliveries with distinct keys; each is expected
    to get ``expected_statuses[i]`` every time it is sent (default: all ``DELIVERED``). Sends
    an empty batch, the first half alone, then the whole batch twice (as the outbox does when
    it retries a partly delivered batch), then the whole batch again from a new instance (as
    after a restart), closing each instance. With ``bad_config``, checks it is rejected with
    ``InvalidArgument`` naming the fields.
    """
    _check_class(cls, Activator)
    if bad_config is not None:
        _check_rejects(cls, bad_config)
    deliveries = list(make_deliveries())
    keys = [delivery.idempotency_key for delivery in deliveries]
    if len(deliveries) < 2 or len(set(keys)) != len(keys):
        raise AssertionError("make_deliveries() must give at least two deliveries, keys distinct")
    expected = list(expected_statuses or [DeliveryStatus.DELIVERED] * len(deliveries))
    if len(expected) != len(deliveries):
        raise AssertionError("expected_statuses must have one status per delivery")

    activator = cls(config)
    try:
        empty = await activator.deliver([])
        if list(empty) != []:
            raise AssertionError(f"{cls.name} returned {empty!r} for an empty batch; expected []")
        half = len(deliveries) // 2
        steps = [
            ("the first half of the batch", deliveries[:half], expected[:half]),
            ("the whole batch, its first half already sent", deliveries, expected),
            ("the same batch again", deliveries, expected),
        ]
        for what, batch, statuses in steps:
            _check_outcomes(cls.name, what, batch, statuses, await activator.deliver(batch))
    finally:
        await activator.close()

    restarted = cls(config)
    try:
        outcomes = await restarted.deliver(deliveries)
        _check_outcomes(
            cls.name, "the same batch from a new instance", deliveries, expected, outcomes
        )
    finally:
        await restarted.close()


def check_activator(
    cls: type[Activator],
    config: Config,
    make_deliveries: Callable[[], Sequence[Delivery]] = sample_deliveries,
    *,
    bad_config: Config | None = None,
    expected_statuses: Sequence[DeliveryStatus] | None = None,
) -> None:
    """:func:`check_activator_async` for synchronous tests (it runs its own event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(
            check_activator_async(
                cls,
                config,
                make_deliveries,
                bad_config=bad_config,
                expected_statuses=expected_statuses,
            )
        )
        return
    raise RuntimeError("an event loop is running here: await check_activator_async(...) instead")


def _check_class(cls: type[Any], base: type[Any]) -> None:
    try:
        validate_registration(cls, base)
    except PluginRegistrationError as error:
        raise AssertionError(f"{cls!r} cannot be registered: {error}") from None


def _check_rejects(cls: type[SourceConnector] | type[Activator], bad_config: Config) -> None:
    try:
        cls(bad_config)
    except InvalidArgument as error:
        if not any(v.field.startswith("config") for v in error.violations):
            raise AssertionError(
                f"{cls.name} rejected bad_config with InvalidArgument but named no "
                f"config.* field: {error.violations!r}"
            ) from None
        return
    except Exception as error:
        raise AssertionError(
            f"{cls.name} rejected bad_config with {type(error).__name__}: {error}; an invalid "
            "configuration must raise InvalidArgument (the base __init__ does so)"
        ) from error
    raise AssertionError(f"{cls.name} accepted bad_config {bad_config!r}")


def _read_all(
    cls: type[SourceConnector], config: Config, checkpoint: Checkpoint | None
) -> list[SourceBatch]:
    connector = cls(config)
    batches: list[SourceBatch] = []
    try:
        connector.check()
        for batch in connector.read(checkpoint):
            _check_batch(cls.name, batch, len(batches))
            batches.append(batch)
    finally:
        connector.close()
    return batches


def _check_batch(name: str, batch: object, index: int) -> None:
    where = f"{name}: batch {index + 1}"
    if not isinstance(batch, SourceBatch):
        raise AssertionError(f"{where} is {type(batch).__name__}, not a SourceBatch")
    if batch.kind not in get_args(BatchKind):
        raise AssertionError(f"{where} has kind {batch.kind!r}; expected one of {BatchKind}")
    for position, item in enumerate(batch.items):
        if not isinstance(item, Mapping):
            raise AssertionError(f"{where}, item {position} is not a mapping: {item!r}")
        _canonical(item, f"{where}, item {position}")
    if not isinstance(batch.checkpoint, Mapping):
        raise AssertionError(f"{where}: the checkpoint is not a mapping: {batch.checkpoint!r}")
    if json.loads(_canonical(batch.checkpoint, f"{where}, checkpoint")) != batch.checkpoint:
        raise AssertionError(f"{where}: the checkpoint changes in a JSON round trip")


def _check_resumed(what: str, before: list[str], expected: list[str], got: list[str]) -> None:
    if got == expected:
        return
    extra = Counter(got) - Counter(expected)
    missing = Counter(expected) - Counter(got)
    problems = []
    if extra:
        again = sum(count for item, count in extra.items() if item in set(before))
        problems.append(
            f"yielded {extra.total()} item(s) too many ({again} read before the checkpoint: "
            f"duplicates), e.g. {next(iter(extra))}"
        )
    if missing:
        problems.append(
            f"lost {missing.total()} item(s) that follow the checkpoint, e.g. {next(iter(missing))}"
        )
    if not problems:
        problems.append("yielded the remaining items in a different order")
    raise AssertionError(
        f"{what}: got {len(got)} item(s), expected {len(expected)}; " + "; ".join(problems)
    )


def _check_outcomes(
    name: str,
    what: str,
    deliveries: Sequence[Delivery],
    expected: Sequence[DeliveryStatus],
    outcomes: object,
) -> None:
    where = f"{name} delivering {what}"
    if not isinstance(outcomes, list) or len(outcomes) != len(deliveries):
        count = len(outcomes) if isinstance(outcomes, Sequence) else outcomes
        raise AssertionError(
            f"{where} returned {count!r} outcome(s); expected a list of {len(deliveries)}, one "
            "per delivery in order"
        )
    wrong = []
    for delivery, status, outcome in zip(deliveries, expected, outcomes, strict=True):
        if not isinstance(outcome, DeliveryOutcome):
            wrong.append(f"{delivery.idempotency_key}: {outcome!r} is not a DeliveryOutcome")
        elif outcome.status is not status:
            detail = f" ({outcome.error})" if outcome.error else ""
            wrong.append(
                f"{delivery.idempotency_key}: {outcome.status.value}{detail}, "
                f"expected {status.value}"
            )
    if wrong:
        raise AssertionError(f"{where}: " + "; ".join(wrong))


def _canonical(value: object, where: str = "item") -> str:
    """``value`` as sorted-key JSON, so that equal items compare equal as strings."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, default=_plain)
    except (TypeError, ValueError) as error:
        raise AssertionError(f"{where} is not JSON: {error}") from None


def _plain(value: object) -> object:
    # JSONValue allows any Mapping or Sequence; json only knows dict, list and tuple.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")
