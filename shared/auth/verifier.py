"""Turning a presented token into a caller: from the store in identity, by asking identity
elsewhere.

The other services ask identity's ``AuthService.VerifyToken`` and remember the answers: a valid
token for ``auth.cache_seconds`` (so a revocation reaches them within that time), a refused one
for a few seconds (so a client retrying with a bad token costs identity one call, not one per
retry). Answers are keyed by the token's SHA-256, never the token, and the cache is bounded.
Concurrent calls presenting the same new token share one verification.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import grpc

from profilemesh.common.v1 import auth_service_pb2, auth_service_pb2_grpc
from profilemesh.shared.auth.caller import Caller
from profilemesh.shared.auth.token_store import TokenStatus, TokenStore
from profilemesh.shared.auth.tokens import token_digest, token_id_of
from profilemesh.shared.errors import Unauthenticated, Unavailable

log = logging.getLogger(__name__)

REFUSAL_CACHE_SECONDS = 5.0
CACHE_ENTRIES = 10_000

_REASONS = {
    TokenStatus.MALFORMED: "the token is not of the form pm_<token_id>_<secret>",
    TokenStatus.UNKNOWN: "unknown token",
    TokenStatus.REVOKED: "the token was revoked",
    TokenStatus.EXPIRED: "the token has expired",
}
_FROM_PROTO = {
    auth_service_pb2.TOKEN_STATUS_VALID: TokenStatus.VALID,
    auth_service_pb2.TOKEN_STATUS_MALFORMED: TokenStatus.MALFORMED,
    auth_service_pb2.TOKEN_STATUS_UNKNOWN: TokenStatus.UNKNOWN,
    auth_service_pb2.TOKEN_STATUS_REVOKED: TokenStatus.REVOKED,
    auth_service_pb2.TOKEN_STATUS_EXPIRED: TokenStatus.EXPIRED,
}


def refusal(status: TokenStatus) -> Unauthenticated:
    """The error a call presenting a token with ``status`` fails with."""
    return Unauthenticated(_REASONS[status], reason=f"TOKEN_{status.name}")


class TokenVerifier(Protocol):
    """Who presents ``token``; raises :class:`Unauthenticated` for a token that may not be
    used and :class:`Unavailable` when that cannot be found out right now."""

    async def verify(self, token: str) -> Caller: ...

    async def close(self) -> None: ...


class StoreVerifier:
    """Checks tokens against the token store itself (in identity): no cache, so a revocation
    takes effect at the next call."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def verify(self, token: str) -> Caller:
        # A point lookup by primary key: cheaper than a hop to a worker thread.
        verdict = self.store.check(token)
        if verdict.status is not TokenStatus.VALID or verdict.record is None:
            raise refusal(verdict.status)
        return verdict.record.caller()

    async def close(self) -> None:
        """Nothing to close: identity closes the store."""


class VerdictCache:
    """Recent verification outcomes by token digest: a caller, or the status that refused it,
    each until its own deadline. Least recently used entries go first when full."""

    def __init__(
        self, max_entries: int = CACHE_ENTRIES, clock: Callable[[], float] = time.monotonic
    ):
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Caller | TokenStatus]] = OrderedDict()

    def get(self, digest: str) -> Caller | TokenStatus | None:
        """The remembered outcome for ``digest``, or None (never known, or expired)."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        until, outcome = entry
        if until <= self._clock():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return outcome

    def put(self, digest: str, outcome: Caller | TokenStatus, seconds: float) -> None:
        """Remember ``outcome`` for ``seconds``."""
        if seconds <= 0:
            return
        self._entries[digest] = (self._clock() + seconds, outcome)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class RemoteVerifier:
    """Asks identity's ``AuthService.VerifyToken``, through a channel opened on first use (in
    the server's event loop) that sends this service's own token."""

    def __init__(
        self,
        connect: Callable[[], grpc.aio.Channel],
        *,
        cache_seconds: float,
        refusal_seconds: float = REFUSAL_CACHE_SECONDS,
        cache: VerdictCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._connect = connect
        self._channel: grpc.aio.Channel | None = None
        self._stub: auth_service_pb2_grpc.AuthServiceStub | None = None
        self.cache_seconds = cache_seconds
        self.refusal_seconds = refusal_seconds
        self.cache = cache or VerdictCache()
        self._clock = clock
        self._pending: dict[str, asyncio.Future[Caller | TokenStatus]] = {}

    async def verify(self, token: str) -> Caller:
        if token_id_of(token) is None:
            raise refusal(TokenStatus.MALFORMED)
        digest = token_digest(token)
        outcome = self.cache.get(digest)
        if outcome is None:
            outcome = await self._shared_lookup(digest, token)
        if isinstance(outcome, TokenStatus):
            raise refusal(outcome)
        return outcome

    async def _shared_lookup(self, digest: str, token: str) -> Caller | TokenStatus:
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Caller | TokenStatus] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            outcome, seconds = await self._ask_identity(token)
        except BaseException as error:
            # The calls waiting on this one fail with it; a cancellation of this call is not
            # theirs, so they see UNAVAILABLE instead.
            shared = error if isinstance(error, Exception) else Unavailable("verification stopped")
            future.set_exception(shared)
            future.exception()  # marks it retrieved when nobody else waits
            raise
        finally:
            del self._pending[digest]
        future.set_result(outcome)
        self.cache.put(digest, outcome, seconds)
        return outcome

    async def _ask_identity(self, token: str) -> tuple[Caller | TokenStatus, float]:
        """Identity's answer, and how long it may be trusted."""
        if self._stub is None:
            self._channel = self._connect()
            self._stub = auth_service_pb2_grpc.AuthServiceStub(self._channel)
        try:
            response = await self._stub.VerifyToken(
                auth_service_pb2.VerifyTokenRequest(token=token)
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # This service's own token is wrong: every caller would be refused.
                log.error("identity refused this service's token: %s", error.details())
                raise Unavailable(
                    "cannot verify the caller's token: identity refused this service's own "
                    f"token ({error.details()})"
                ) from None
            raise Unavailable(
                f"cannot verify the caller's token: identity answered {error.code().name}"
            ) from None
        status = _FROM_PROTO.get(response.status, TokenStatus.UNKNOWN)
        if status is not TokenStatus.VALID:
            return status, self.refusal_seconds
        seconds = self.cache_seconds
        if response.HasField("expires_at"):
            # Never trusted past its expiry.
            seconds = min(seconds, response.expires_at.ToNanoseconds() / 1e9 - self._clock())
        return Caller(response.token_id, response.name, frozenset(response.scopes)), seconds

    async def close(self) -> None:
        """Close the channel to identity."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
