"""The five services with auth on, as ``profilemesh up`` runs them: every RPC of every service
refuses a call without a token, refuses a token without the RPC's scope, and serves a token with
exactly that scope; health stays open; a revoked token is refused; calls leave audit entries.

The mesh starts once for the module, with no token configured, so it makes its own admin
token, as a developer's ``make up`` does; the test process reads it from ``admin.token``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from profilemesh.common.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    auth_service_pb2,
    auth_service_pb2_grpc,
)
from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.services.ingestion.client import Client
from profilemesh.services.mesh import Mesh
from profilemesh.services.runner import load_app
from profilemesh.shared.auth.outbound import client_token
from profilemesh.shared.auth.scopes import ADMIN, SCOPES, required_scope
from profilemesh.shared.auth.tokens import token_id_of
from profilemesh.shared.channel import channel_to
from profilemesh.shared.settings import SERVICE_NAMES, AuthSettings, Endpoint, Endpoints, Settings
from tests.conftest import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
DEADLINE_SECONDS = 2.0


@dataclass(frozen=True)
class Rpc:
    """One method a service serves."""

    service: str
    target: str
    full_name: str
    client_streaming: bool
    server_streaming: bool

    @property
    def scope(self) -> str:
        return required_scope(self.full_name)


@dataclass
class AuthMesh:
    settings: Settings
    admin: str
    tokens: dict[tuple[str, str], str]
    """(kind, scope) -> token; kind "only" holds the scope alone, "others" every other scope."""

    def target(self, service: str) -> str:
        return self.settings.services.of(service).target


def _rpcs(settings: Settings) -> list[Rpc]:
    """Every method of every gRPC service each service hosts (built, not started)."""
    pool = descriptor_pool.Default()
    found = []
    for service in SERVICE_NAMES:
        target = settings.services.of(service).target
        for binding in load_app(service, settings).bindings:
            for method in pool.FindServiceByName(binding.name).methods:
                found.append(
                    Rpc(
                        service,
                        target,
                        f"/{binding.name}/{method.name}",
                        method.client_streaming,
                        method.server_streaming,
                    )
                )
    return found


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        data_dir=tmp_path_factory.mktemp("auth-mesh") / "data",
        grace_seconds=2.0,
        log_level="WARNING",
        services=Endpoints(**{name: Endpoint(port=free_port()) for name in SERVICE_NAMES}),
        # On, with no token: the launcher makes the local admin token.
        auth=AuthSettings(enabled=True),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(settings: Settings) -> AsyncIterator[AuthMesh]:
    launcher = Mesh(settings)
    launcher.start()
    try:
        await launcher.wait_until_serving(90)
        admin = client_token(settings)
        assert admin is not None and launcher.admin_token_file is not None
        tokens = await _tokens(settings, admin)
        yield AuthMesh(settings, admin, tokens)
    finally:
        await asyncio.to_thread(launcher.stop)


async def _tokens(settings: Settings, admin: str) -> dict[tuple[str, str], str]:
    """For every scope: a token with it alone, and one with every other scope."""
    ordinary = [scope for scope in SCOPES if scope != ADMIN]
    tokens = {}
    async with channel_to("identity", settings) as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        for scope in SCOPES:
            for kind, scopes in (
                ("only", [scope]),
                ("others", [s for s in ordinary if s != scope]),
            ):
                request = auth_service_pb2.CreateTokenRequest(name=f"{kind}-{scope}", scopes=scopes)
                tokens[kind, scope] = (await stub.CreateToken(request)).token
    return tokens


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


def _requests() -> Iterator[bytes]:
    yield b""


async def _call(channel: grpc.aio.Channel, rpc: Rpc, token: str | None) -> grpc.StatusCode:
    """Call ``rpc`` with an empty request; the status it ends with."""
    options: dict[str, Any] = {"metadata": _bearer(token), "timeout": DEADLINE_SECONDS}
    try:
        if rpc.client_streaming and rpc.server_streaming:
            async for _ in channel.stream_stream(rpc.full_name)(_requests(), **options):
                pass
        elif rpc.client_streaming:
            await channel.stream_unary(rpc.full_name)(_requests(), **options)
        elif rpc.server_streaming:
            async for _ in channel.unary_stream(rpc.full_name)(b"", **options):
                pass
        else:
            await channel.unary_unary(rpc.full_name)(b"", **options)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_every_rpc_needs_a_token_with_its_scope(mesh: AuthMesh) -> None:
    rpcs = _rpcs(mesh.settings)
    assert len(rpcs) > 80
    channels = {name: grpc.aio.insecure_channel(mesh.target(name)) for name in SERVICE_NAMES}
    limit = asyncio.Semaphore(8)

    async def outcomes(rpc: Rpc) -> tuple[Rpc, grpc.StatusCode, grpc.StatusCode, grpc.StatusCode]:
        channel = channels[rpc.service]
        async with limit:
            anonymous = await _call(channel, rpc, None)
            others = await _call(channel, rpc, mesh.tokens["others", rpc.scope])
            only = await _call(channel, rpc, mesh.tokens["only", rpc.scope])
        return rpc, anonymous, others, only

    try:
        results = await asyncio.gather(*(outcomes(rpc) for rpc in rpcs))
    finally:
        for channel in channels.values():
            await channel.close()
    problems = []
    for rpc, anonymous, others, only in results:
        if anonymous != grpc.StatusCode.UNAUTHENTICATED:
            problems.append(f"{rpc.full_name} on {rpc.service} without a token: {anonymous.name}")
        if others != grpc.StatusCode.PERMISSION_DENIED:
            problems.append(f"{rpc.full_name} without {rpc.scope}: {others.name}")
        if only in REFUSED:
            problems.append(f"{rpc.full_name} with exactly {rpc.scope}: {only.name}")
    assert not problems, "\n".join(problems)


async def test_health_stays_open(mesh: AuthMesh) -> None:
    for service in SERVICE_NAMES:
        async with grpc.aio.insecure_channel(mesh.target(service)) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=DEADLINE_SECONDS
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_a_revoked_token_is_refused_by_identity_at_once(mesh: AuthMesh) -> None:
    async with channel_to("identity", mesh.settings) as admin:
        auth = auth_service_pb2_grpc.AuthServiceStub(admin)
        created = await auth.CreateToken(
            auth_service_pb2.CreateTokenRequest(name="leaver", scopes=["profiles:read"])
        )
    token = created.token
    lookup = identity_service_pb2.GetProfileRequest(profile_id="nobody")
    features_request = features_service_pb2.GetFeaturesRequest(profile_id="nobody")
    async with (
        grpc.aio.insecure_channel(mesh.target("identity")) as identity_channel,
        grpc.aio.insecure_channel(mesh.target("features")) as features_channel,
    ):
        identity = identity_service_pb2_grpc.IdentityServiceStub(identity_channel)
        features = features_service_pb2_grpc.FeaturesServiceStub(features_channel)
        before = await _status(identity.GetProfile(lookup, metadata=_bearer(token)))
        assert before == grpc.StatusCode.NOT_FOUND
        assert (
            await _status(features.GetFeatures(features_request, metadata=_bearer(token)))
            not in REFUSED
        )
        async with channel_to("identity", mesh.settings) as admin:
            await auth_service_pb2_grpc.AuthServiceStub(admin).RevokeToken(
                auth_service_pb2.RevokeTokenRequest(token_id=created.metadata.token_id)
            )
        after = await _status(identity.GetProfile(lookup, metadata=_bearer(token)))
        assert after == grpc.StatusCode.UNAUTHENTICATED
        # Features trusts what identity verified for auth.cache_seconds (30 s by default).
        cached = await _status(features.GetFeatures(features_request, metadata=_bearer(token)))
        assert cached not in REFUSED


async def _status(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_data_access_call_leaves_an_audit_entry_that_cannot_be_changed(
    mesh: AuthMesh,
) -> None:
    token = mesh.tokens["only", "profiles:read"]
    async with grpc.aio.insecure_channel(mesh.target("identity")) as channel:
        identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
        request = identity_service_pb2.GetProfileRequest(profile_id="someone")
        assert await _status(identity.GetProfile(request, metadata=_bearer(token))) not in REFUSED
        audit = audit_service_pb2_grpc.AuditServiceStub(channel)
        listed = await audit.ListAuditEntries(
            audit_service_pb2.ListAuditEntriesRequest(
                token_id=token_id_of(token) or "",
                method_prefix="/profilemesh.identity.v1.IdentityService/GetProfile",
            ),
            metadata=_bearer(mesh.tokens["only", "audit:read"]),
        )
        check = await audit.VerifyAuditChain(
            audit_service_pb2.VerifyAuditChainRequest(),
            metadata=_bearer(mesh.tokens["only", "audit:read"]),
        )
    assert listed.entries, "no audit entry for the call"
    entry = listed.entries[0]
    assert entry.token_id == token_id_of(token)
    assert entry.token_name == "only-profiles:read"
    assert entry.service == "identity"
    assert entry.status_code == "NOT_FOUND"
    assert check.chain_valid and check.entries_checked > 0
    path = mesh.settings.service_data_dir("identity") / "audit.sqlite"
    with sqlite3.connect(path) as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit_entries SET token_name = 'someone else'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit_entries")


async def test_the_command_line_uses_the_local_admin_token(mesh: AuthMesh) -> None:
    env = {**os.environ, **mesh.settings.to_env()}
    listed = await _run(env, "tokens", "list")
    assert listed.returncode == 0, listed.stderr
    assert "bootstrap" in listed.stdout and "only-audit:read" in listed.stdout
    audit = await _run(env, "audit", "--service", "identity", "--limit", "5")
    assert audit.returncode == 0, audit.stderr
    assert "/profilemesh.common.v1.AuthService/" in audit.stdout
    refused = await _run({**env, "PROFILEMESH_AUTH__TOKEN": mesh.tokens["only", "audit:read"]},
                         "tokens", "list")  # fmt: skip
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr and "'admin'" in refused.stderr


async def test_the_event_client_sends_its_token(mesh: AuthMesh) -> None:
    def send(token: str | None) -> tuple[int, int]:
        target = mesh.target("ingestion")
        with Client(target, sync_mode=True, token=token, max_retries=0) as client:
            client.track("user-1", "Order Completed")
            return client.accepted, client.failed

    assert await asyncio.to_thread(send, mesh.tokens["only", "events:write"]) == (1, 0)
    with pytest.raises(grpc.RpcError) as refused:  # sync mode raises what it cannot deliver
        await asyncio.to_thread(send, None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "profilemesh.services.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_admin_token_file_is_private(settings: Settings, mesh: AuthMesh) -> None:
    path = Path(settings.data_dir) / "admin.token"
    assert path.read_text().strip() == mesh.admin
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
