"""What the mesh measures, through the OpenTelemetry metrics API, and its Prometheus endpoint.

The instruments are made at import from the global meter provider. Until one is installed
(``metrics_port`` unset, the default) they are the API's no-ops: recording costs a call.
:func:`configure_metrics` installs the SDK with a Prometheus reader and serves ``/metrics``.

Names follow the OpenTelemetry semantic conventions where there is one, else ``profilemesh.*``:

- ``rpc.server.duration`` (histogram, ms): every served call, with ``rpc.system``,
  ``rpc.service``, ``rpc.method`` and ``rpc.grpc.status_code``; its count is the call rate
  and the calls whose status code is not 0 are the errors.
- ``messaging.client.consumed.messages`` (counter) and ``messaging.process.duration``
  (histogram, s): records applied by a log consumer and the time each batch took, with
  ``messaging.system``, ``messaging.destination.name`` (the stream),
  ``messaging.destination.partition.id`` and ``messaging.consumer.group.name`` (the consumer).
- ``profilemesh.consumer.lag`` (gauge): records retained but not applied yet, with
  ``consumer``, ``stream`` and ``partition``.
- ``profilemesh.deliveries`` (counter): settled deliveries, with ``activator`` and
  ``outcome`` (``delivered``, ``retried``, ``dead_lettered``, ``skipped_no_consent``,
  ``skipped_frequency_cap``).

Prometheus sees dots as underscores, the unit appended and ``_total`` on counters:
``rpc_server_duration_milliseconds``, ``messaging_client_consumed_messages_total``,
``messaging_process_duration_seconds``, ``profilemesh_consumer_lag``,
``profilemesh_deliveries_total``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource

from profilemesh.shared.settings import Settings

if TYPE_CHECKING:
    from profilemesh.shared.log.consumer import LogConsumer

LAG_TIMEOUT_SECONDS = 2.0
"""How long a collection waits for the consumers to say how far behind they are."""

MILLISECOND_BUCKETS = [0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000]
"""Bounds of the duration histograms, in ms (divided by 1000 for seconds): the SDK's defaults
(0, 5, 10 ... 10 000) say nothing about calls and batches under 5 ms, which most are."""

_meter = metrics.get_meter("profilemesh")

rpc_server_duration = _meter.create_histogram(
    "rpc.server.duration",
    unit="ms",
    description="Duration of the calls a service served.",
    explicit_bucket_boundaries_advisory=MILLISECOND_BUCKETS,
)
consumed_messages = _meter.create_counter(
    "messaging.client.consumed.messages",
    unit="{message}",
    description="Log records applied by a consumer.",
)
process_duration = _meter.create_histogram(
    "messaging.process.duration",
    unit="s",
    description="Time a consumer took to apply one batch of log records.",
    explicit_bucket_boundaries_advisory=[bound / 1000 for bound in MILLISECOND_BUCKETS],
)
deliveries = _meter.create_counter(
    "profilemesh.deliveries",
    unit="{delivery}",
    description="Deliveries settled by activation, by activator and outcome.",
)


class MetricsPortInUse(RuntimeError):
    """``/metrics`` could not be served on the configured port."""


def configure_metrics(
    settings: Settings, service: str, *, readers: Sequence[MetricReader] = ()
) -> MeterProvider | None:
    """Install the process-wide meter provider for ``service`` and serve Prometheus'
    ``/metrics`` on ``settings.metrics_port``; ``None`` (nothing installed) when it is unset.

    ``readers`` are read besides Prometheus (tests read metrics in memory).
    """
    if settings.metrics_port is None:
        return None
    # Imported here: a process that exports no metrics never loads the exporter.
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    name = settings.service_name or f"profilemesh-{service}"
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(), *readers],
        resource=Resource.create({SERVICE_NAME: name}),
    )
    try:
        start_http_server(settings.metrics_port, addr=settings.bind_host)
    except OSError as error:
        raise MetricsPortInUse(
            f"cannot serve /metrics on {settings.bind_host}:{settings.metrics_port}: {error}"
        ) from error
    metrics.set_meter_provider(provider)
    atexit.register(provider.shutdown)
    return provider


# -- consumer lag ----------------------------------------------------------------------------

_watched: dict[LogConsumer[Any], asyncio.AbstractEventLoop] = {}
_last_lag: dict[LogConsumer[Any], dict[int, int]] = {}
_watched_lock = threading.Lock()


def watch_lag(consumer: LogConsumer[Any]) -> None:
    """Report how far ``consumer`` is behind from now on (called on its event loop)."""
    with _watched_lock:
        _watched[consumer] = asyncio.get_running_loop()


def unwatch_lag(consumer: LogConsumer[Any]) -> None:
    """Stop reporting ``consumer`` (it stopped)."""
    with _watched_lock:
        _watched.pop(consumer, None)
        _last_lag.pop(consumer, None)


def _observe_lag(options: CallbackOptions) -> Iterable[Observation]:
    # A collection runs in the exporter's thread (a Prometheus scrape) while the consumers
    # live on their event loop: ask each loop and wait, all consumers at once. Collected on
    # that loop itself, waiting would deadlock: the last value collected elsewhere is given.
    with _watched_lock:
        watched = list(_watched.items())
    asked: list[tuple[LogConsumer[Any], concurrent.futures.Future[dict[int, int]] | None]] = []
    for consumer, loop in watched:
        if loop.is_closed() or _running_loop() is loop:
            asked.append((consumer, None))
        else:
            asked.append((consumer, asyncio.run_coroutine_threadsafe(consumer.lag(), loop)))
    deadline = time.monotonic() + LAG_TIMEOUT_SECONDS
    observations = []
    for consumer, future in asked:
        lag = None
        if future is not None:
            try:
                lag = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # unknown now (a producer is down): no point rather than a stale one
                future.cancel()
                continue
        with _watched_lock:
            if lag is not None:
                _last_lag[consumer] = lag
            else:
                lag = _last_lag.get(consumer)
        for partition, behind in sorted((lag or {}).items()):
            observations.append(
                Observation(
                    behind,
                    {
                        "consumer": consumer.name,
                        "stream": consumer.source.stream,
                        "partition": partition,
                    },
                )
            )
    return observations


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_meter.create_observable_gauge(
    "profilemesh.consumer.lag",
    callbacks=[_observe_lag],
    unit="{message}",
    description="Log records retained but not applied yet by a consumer, per partition.",
)
