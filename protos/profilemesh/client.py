"""Send events to profilemesh from Python, the way analytics-python sends them to Segment.

The module-level functions use a default client, built on first use from this module's
attributes::

    import profilemesh.client as profilemesh

    profilemesh.target = "ingestion.internal:50051"
    profilemesh.source = "backend"
    profilemesh.track("user-1", "Order Completed", {"revenue": 42.5})
    profilemesh.identify("user-1", {"email": "ada@example.com"})

Each call queues the event and returns its message id at once; a background thread sends the
queue in batches, and whatever is still queued is sent when the interpreter exits.
``configure(...)`` sets the same attributes plus any other ``Client`` option, and a program that
talks to several services or sources builds its own ``Client`` objects instead.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from profilemesh.services.ingestion.client import (
    DEFAULT_TARGET,
    Client,
    ClientClosedError,
    ClientError,
    DeliveryAbandonedError,
    ErrorCallback,
    QueueFullError,
    RejectedCallback,
    RejectedEvent,
)

__all__ = [
    "Client",
    "ClientClosedError",
    "ClientError",
    "DeliveryAbandonedError",
    "QueueFullError",
    "RejectedEvent",
    "alias",
    "configure",
    "default_client",
    "flush",
    "group",
    "identify",
    "page",
    "screen",
    "shutdown",
    "track",
]

target: str = DEFAULT_TARGET
"""Address of the ingestion service the default client sends to."""
source: str = "api"
"""Source name the default client sends as; selects the service's tracking plan."""
on_error: ErrorCallback | None = None
"""The default client's ``on_error`` callback."""
on_rejected: RejectedCallback | None = None
"""The default client's ``on_rejected`` callback."""
sync_mode: bool = False
"""Whether the default client sends in the calling thread."""

_options: dict[str, Any] = {}
_default: Client | None = None
_lock = threading.Lock()

_P = ParamSpec("_P")
_R = TypeVar("_R")


def configure(
    *,
    target: str | None = None,
    source: str | None = None,
    **options: Any,
) -> Client:
    """Replace the default client with one built from these settings and return it.

    ``target`` and ``source`` update the module attributes of the same names; ``options`` are
    any other ``Client`` keyword arguments (``flush_interval``, ``on_error``, ``sync_mode``
    ...); ``on_error``, ``on_rejected`` and ``sync_mode`` update the module attributes too,
    the others replace those of an earlier ``configure``. The previous default client, if any, is
    shut down first, so its queued events are sent.
    """
    global _default, _options
    # The parameters shadow the module attributes they set.
    module = globals()
    with _lock:
        if target is not None:
            module["target"] = target
        if source is not None:
            module["source"] = source
        for name in ("on_error", "on_rejected", "sync_mode"):
            if name in options:
                module[name] = options.pop(name)
        _options = options
        # Built now rather than on first use, so a wrong option fails here, where it was given.
        client = _build()
        previous, _default = _default, client
    # Outside the lock: flushing may take a while and other threads may track meanwhile.
    if previous is not None:
        previous.shutdown()
    return client


def default_client() -> Client:
    """The default client, built from the module attributes on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = _build()
        return _default


def _build() -> Client:
    return Client(
        target,
        source=source,
        on_error=on_error,
        on_rejected=on_rejected,
        sync_mode=sync_mode,
        **_options,
    )


def flush(timeout: float | None = None) -> bool:
    """Send what the default client has queued and wait until it is sent or failed; False when
    ``timeout`` ran out first. Does nothing when no default client exists."""
    with _lock:
        client = _default
    return True if client is None else client.flush(timeout)


def shutdown(timeout: float | None = None) -> bool:
    """Flush and stop the default client; the next call builds a new one from the module
    attributes. Also happens at interpreter exit."""
    global _default
    with _lock:
        client, _default = _default, None
    return True if client is None else client.shutdown(timeout)


def _on_default(method: Callable[Concatenate[Client, _P], _R]) -> Callable[_P, _R]:
    """``method`` called on the default client, with the same signature and docstring."""

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return method(default_client(), *args, **kwargs)

    # help() and IDEs should show a module function of this module, without `self`.
    call.__module__ = __name__
    call.__qualname__ = method.__name__
    signature = inspect.signature(method)
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:]
    )
    return call


track = _on_default(Client.track)
identify = _on_default(Client.identify)
page = _on_default(Client.page)
screen = _on_default(Client.screen)
group = _on_default(Client.group)
alias = _on_default(Client.alias)
