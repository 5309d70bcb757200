"""What a service hands to the runner: the gRPC services it hosts and its lifecycle hooks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from profilemesh.shared.server import ServiceBinding

if TYPE_CHECKING:
    from profilemesh.shared.auth.verifier import TokenVerifier


@dataclass
class ServiceApp:
    """One service of the mesh, ready to be served.

    ``startup`` hooks run before the server accepts calls (recovery, opening stores);
    ``cleanup`` hooks run after it has stopped (flushing, closing stores), in reverse order.
    """

    name: str
    bindings: list[ServiceBinding]
    startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    token_verifier: TokenVerifier | None = None
    """How the service checks its callers' tokens; None: by asking identity (see
    :mod:`profilemesh.shared.auth.hosting`)."""

    async def start(self) -> None:
        """Run the start-up hooks in order."""
        for hook in self.startup:
            await hook()

    async def close(self) -> None:
        """Run the clean-up hooks, last registered first."""
        for hook in reversed(self.cleanup):
            await hook()
