"""Identity keeps the mesh's API tokens: it opens the token store, serves ``AuthService`` and
verifies its own callers against the store directly (the other services ask it).

At start-up it makes sure the ``auth.bootstrap_token`` setting, when given, is a known ``admin``
token named ``bootstrap``: how a fresh mesh (or a Kubernetes Secret) gets its first token.
"""

from __future__ import annotations

import asyncio
import logging

from profilemesh.common.v1 import auth_service_pb2, auth_service_pb2_grpc
from profilemesh.services.identity.auth_servicer import AuthServicer
from profilemesh.shared.auth.scopes import ADMIN
from profilemesh.shared.auth.token_store import BOOTSTRAP_NAME, TokenStore, token_store
from profilemesh.shared.auth.verifier import StoreVerifier
from profilemesh.shared.server import bind
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import Settings

log = logging.getLogger(__name__)


def host_tokens(app: ServiceApp, settings: Settings) -> TokenStore:
    """Give ``app`` the token store, ``AuthService`` and a verifier reading the store."""
    store = token_store(settings)
    app.bindings.append(
        bind(auth_service_pb2, auth_service_pb2_grpc, "AuthService", AuthServicer(store))
    )
    app.token_verifier = StoreVerifier(store)
    bootstrap = settings.auth.bootstrap_token

    def open_store() -> None:
        store.open()
        if bootstrap:
            record = store.ensure(bootstrap, BOOTSTRAP_NAME, [ADMIN])
            if record.revoked_at is not None:
                log.warning("the bootstrap token %s is revoked; it stays refused", record.token_id)

    async def open_tokens() -> None:
        await asyncio.to_thread(open_store)

    async def close_tokens() -> None:
        await asyncio.to_thread(store.close)

    # Open before anything else and closed last: calls are verified against it throughout.
    app.startup.insert(0, open_tokens)
    app.cleanup.insert(0, close_tokens)
    return store
