"""How every service gets its access guard and audit log, in one place.

:func:`guard_app` is applied by the runner to each service it builds: it adds the
``AuditService`` binding (which brings the guard as the server's interceptor), opens the audit
log at start-up and closes it last. Callers' tokens are checked by the verifier the service
chose (identity reads its token store) or else by asking identity.
"""

from __future__ import annotations

import asyncio

from profilemesh.shared.auth.audit_log import AuditLog
from profilemesh.shared.auth.audit_servicer import AuditServicer, audit_service_binding
from profilemesh.shared.auth.guard import AccessGuard
from profilemesh.shared.auth.verifier import RemoteVerifier, TokenVerifier
from profilemesh.shared.channel import channel_to
from profilemesh.shared.log import stores
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings

AUDIT_STORE = "audit"
"""The store holding a service's audit log: ``<data_dir>/<service>/audit.sqlite`` on the
embedded backend, the schema ``profilemesh_<service>_audit`` on the ``postgres`` one."""


def guard_app(app: ServiceApp, settings: Settings) -> AccessGuard:
    """Give ``app`` its audit log, the ``AuditService`` and the access guard; returns the
    guard."""
    audit = AuditLog(lambda: stores.open_store(settings, app.name, AUDIT_STORE), app.name)
    verifier: TokenVerifier | None = None
    if settings.auth.enabled:
        verifier = app.token_verifier or RemoteVerifier(
            # Opened on first use, inside the server's event loop.
            lambda: channel_to("identity", settings),
            cache_seconds=settings.auth.cache_seconds,
        )
    guard = AccessGuard(app.name, verifier=verifier, audit=audit)
    app.bindings.append(audit_service_binding(AuditServicer(audit), (guard,)))

    async def open_audit() -> None:
        await asyncio.to_thread(audit.open)

    async def close_guard() -> None:
        if verifier is not None and verifier is not app.token_verifier:
            await verifier.close()
        await asyncio.to_thread(audit.close)

    # First to open and, clean-up running in reverse, last to close: every call is recorded.
    app.startup.insert(0, open_audit)
    app.cleanup.insert(0, close_guard)
    return guard
