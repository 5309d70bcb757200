"""gRPC adapter of the token store: ``profilemesh.common.v1.AuthService``, hosted by identity.

The other services call ``VerifyToken`` to authenticate their callers; people and tools call
the rest with an ``admin`` token (the access guard checks the scopes before these run).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from profilemesh.common.v1 import auth_service_pb2, auth_service_pb2_grpc
from profilemesh.shared.auth.caller import current_caller
from profilemesh.shared.auth.token_messages import token_to_proto
from profilemesh.shared.auth.token_store import TokenStatus, TokenStore
from profilemesh.shared.errors import InvalidArgument

log = logging.getLogger(__name__)

_STATUS = {
    TokenStatus.VALID: auth_service_pb2.TOKEN_STATUS_VALID,
    TokenStatus.MALFORMED: auth_service_pb2.TOKEN_STATUS_MALFORMED,
    TokenStatus.UNKNOWN: auth_service_pb2.TOKEN_STATUS_UNKNOWN,
    TokenStatus.REVOKED: auth_service_pb2.TOKEN_STATUS_REVOKED,
    TokenStatus.EXPIRED: auth_service_pb2.TOKEN_STATUS_EXPIRED,
}


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    """Serves ``AuthService`` over identity's :class:`TokenStore`."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def CreateToken(
        self, request: auth_service_pb2.CreateTokenRequest, context: Any
    ) -> auth_service_pb2.CreateTokenResponse:
        ttl = request.ttl.ToTimedelta().total_seconds() if request.HasField("ttl") else None
        token, record = await asyncio.to_thread(
            self.store.create, request.name, list(request.scopes), ttl_seconds=ttl
        )
        caller = current_caller()
        log.info(
            "token %s (%s) created with scopes %s by %s",
            record.token_id,
            record.name,
            ",".join(record.scopes),
            caller.token_id or caller.name,
        )
        return auth_service_pb2.CreateTokenResponse(token=token, metadata=token_to_proto(record))

    async def RevokeToken(
        self, request: auth_service_pb2.RevokeTokenRequest, context: Any
    ) -> auth_service_pb2.RevokeTokenResponse:
        if not request.token_id:
            raise InvalidArgument.for_field("token_id", "required")
        record = await asyncio.to_thread(self.store.revoke, request.token_id)
        caller = current_caller()
        log.info(
            "token %s (%s) revoked by %s",
            record.token_id,
            record.name,
            caller.token_id or caller.name,
        )
        return auth_service_pb2.RevokeTokenResponse(metadata=token_to_proto(record))

    async def ListTokens(
        self, request: auth_service_pb2.ListTokensRequest, context: Any
    ) -> auth_service_pb2.ListTokensResponse:
        records = self.store.tokens(include_inactive=request.include_inactive)
        return auth_service_pb2.ListTokensResponse(tokens=[token_to_proto(r) for r in records])

    async def VerifyToken(
        self, request: auth_service_pb2.VerifyTokenRequest, context: Any
    ) -> auth_service_pb2.VerifyTokenResponse:
        verdict = self.store.check(request.token)
        response = auth_service_pb2.VerifyTokenResponse(status=_STATUS[verdict.status])
        record = verdict.record
        if verdict.status is TokenStatus.VALID and record is not None:
            response.token_id = record.token_id
            response.name = record.name
            response.scopes.extend(record.scopes)
            if record.expires_at is not None:
                response.expires_at.FromNanoseconds(int(record.expires_at * 1e9))
        return response
