"""The server interceptor that checks every call's token and scope and records the call.

For each call it finds the scope the method needs (:mod:`.scopes`), reads
``authorization: Bearer <token>``, asks the service's verifier who that is, and either lets the
call through, with the caller set for the servicer (:mod:`.caller`), or fails it:
UNAUTHENTICATED without a valid token, PERMISSION_DENIED (naming the missing scope) without
the scope. Then, whatever happened, it records the call in the service's audit log: who, what,
from where, how it ended and how long it took.

It sits inside the error interceptor, so it raises domain errors like any servicer, and it
wraps the method handler (unary or streaming alike) rather than deciding alone, because the
peer and the final status are only known while and after the call runs. A refused call's
request is never decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from profilemesh.shared.auth.audit_log import AuditLog, AuditRecord
from profilemesh.shared.auth.caller import (
    ANONYMOUS,
    Caller,
    reset_current_caller,
    set_current_caller,
)
from profilemesh.shared.auth.outbound import AUTHORIZATION
from profilemesh.shared.auth.scopes import grants, is_audited, is_open, required_scope
from profilemesh.shared.auth.verifier import TokenVerifier
from profilemesh.shared.errors import DomainError, PermissionDenied, Unauthenticated, Unavailable
from profilemesh.shared.method_wrapping import rewrap

log = logging.getLogger(__name__)

_BEARER = "bearer "

Record = Callable[[str, str], None]
"""Records how a call ended: its peer and status code name."""


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None without one."""
    for key, value in metadata or ():
        if key != AUTHORIZATION:
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        if text[: len(_BEARER)].lower() == _BEARER:
            return text[len(_BEARER) :].strip() or None
        return None
    return None


class AccessGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates, authorizes and audits the calls of one service.

    ``verifier`` None means auth is off: every call goes through as ``anonymous`` and is still
    recorded. ``audit`` None records nothing.
    """

    def __init__(
        self, service: str, *, verifier: TokenVerifier | None, audit: AuditLog | None
    ) -> None:
        self.service = service
        self.verifier = verifier
        self.audit = audit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        started = time.perf_counter()
        handler = await continuation(details)
        method: str = details.method
        if handler is None or is_open(method):
            return handler
        audited = self.audit is not None and is_audited(method)
        if self.verifier is None and not audited:
            return handler
        caller, refused = await self._admit(method, details.invocation_metadata)
        record = self._recorder(method, caller, started) if audited else None
        return _guarded(handler, caller, refused, record)

    async def _admit(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None
    ) -> tuple[Caller, DomainError | None]:
        """The caller, and the error its call fails with (None: it may go ahead)."""
        if self.verifier is None:
            return ANONYMOUS, None
        token = bearer_token(metadata)
        if token is None:
            return ANONYMOUS, Unauthenticated(
                f"{method} needs a token: send 'authorization: Bearer <token>'",
                reason="TOKEN_MISSING",
            )
        try:
            caller = await self.verifier.verify(token)
        except DomainError as error:
            return ANONYMOUS, error
        except Exception:  # a verifier's bug must not let a call through, nor escape here
            log.exception("verifying the caller of %s failed", method)
            return ANONYMOUS, Unavailable("the caller's token could not be verified")
        needed = required_scope(method)
        if not grants(caller.scopes, needed):
            return caller, PermissionDenied(
                f"token {caller.name!r} ({caller.token_id}) lacks the scope {needed!r} "
                f"that {method} needs",
                reason="SCOPE_MISSING",
                metadata={"scope": needed},
            )
        return caller, None

    def _recorder(self, method: str, caller: Caller, started: float) -> Record:
        audit = self.audit
        assert audit is not None

        def record(peer: str, status_code: str) -> None:
            audit.record(
                AuditRecord(
                    time_us=time.time_ns() // 1000,
                    service=self.service,
                    method=method,
                    token_id=caller.token_id,
                    token_name=caller.name,
                    peer=peer,
                    status_code=status_code,
                    duration_us=int((time.perf_counter() - started) * 1e6),
                )
            )

        return record


def _guarded(
    handler: grpc.RpcMethodHandler,
    caller: Caller,
    refused: DomainError | None,
    record: Record | None,
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` that fails with ``refused`` or runs as ``caller``, and records
    how the call ended."""

    @contextlib.asynccontextmanager
    async def guarded(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        reset = set_current_caller(caller)
        status = "OK"
        try:
            if refused is not None:
                raise refused
            yield
            status = _set_code(context)
        except BaseException as error:
            status = _status_of(error, context)
            raise
        finally:
            reset_current_caller(reset)
            if record is not None:
                record(_peer(context), status)

    # A refused call's request bytes are passed through undecoded.
    deserializer = None if refused is not None else handler.request_deserializer
    return rewrap(handler, guarded, request_deserializer=deserializer)


def _status_of(error: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status a call that raised ``error`` ends with (the error interceptor, outside this
    one, maps the same way)."""
    if isinstance(error, DomainError):
        return error.code
    if isinstance(error, grpc.aio.AbortError):
        return _set_code(context, default="UNKNOWN")
    if isinstance(error, NotImplementedError):
        return "UNIMPLEMENTED"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "INTERNAL"


def _set_code(context: grpc.aio.ServicerContext, default: str = "OK") -> str:
    """The code the servicer set on ``context`` (with ``set_code`` or ``abort``), if any."""
    code = context.code()
    return str(code.name) if isinstance(code, grpc.StatusCode) else default


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:  # the call is gone; the peer is unknown
        return ""
