"""Resolving an identifier to a profile id through the identity service.

Features keeps no identifier index of its own: identity owns that mapping (with its
normalisers and blocked values), and a lookup by identifier costs one call to it.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from profilemesh.common.v1 import identifier_pb2
from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.shared.errors import InvalidArgument, NotFound, Unavailable


class IdentityLookup:
    """Identifier -> profile id, over a channel opened on first use."""

    def __init__(self, connect: Callable[[], grpc.aio.Channel]) -> None:
        self._connect = connect
        self._channel: grpc.aio.Channel | None = None
        self._stub: identity_service_pb2_grpc.IdentityServiceStub | None = None

    async def profile_id(self, identifier: identifier_pb2.Identifier, field: str) -> str:
        """The profile holding ``identifier``; :class:`NotFound` naming ``field`` otherwise."""
        if not identifier.type or not identifier.value:
            raise InvalidArgument.for_field(field, "type and value are required")
        if self._stub is None:
            self._channel = self._connect()
            self._stub = identity_service_pb2_grpc.IdentityServiceStub(self._channel)
        try:
            response = await self._stub.ResolveIdentifiers(
                identity_service_pb2.ResolveIdentifiersRequest(identifiers=[identifier])
            )
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"identity could not resolve the identifier: {error.details()}"
            ) from None
        [resolution] = response.resolutions
        if not resolution.found:
            raise NotFound("no such profile", violations=[(field, "no profile has it")])
        profile_id: str = resolution.profile_id
        return profile_id

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
