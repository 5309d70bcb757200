"""API tokens, scopes, the access guard and the audit log, one piece at a time."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import pkgutil
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import profilemesh
from profilemesh.common.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    auth_service_pb2,
    auth_service_pb2_grpc,
    log_service_pb2,
    log_service_pb2_grpc,
)
from profilemesh.services.audit_command import parse_when
from profilemesh.services.cli import main
from profilemesh.services.identity.auth_servicer import AuthServicer
from profilemesh.shared.auth.audit_log import AuditLog, AuditQuery, AuditRecord
from profilemesh.shared.auth.caller import ANONYMOUS, current_caller
from profilemesh.shared.auth.guard import bearer_token
from profilemesh.shared.auth.hosting import guard_app
from profilemesh.shared.auth.local_admin import prepare_local_admin
from profilemesh.shared.auth.outbound import admin_token_path, client_token
from profilemesh.shared.auth.scopes import (
    ADMIN,
    METHOD_SCOPES,
    SCOPES,
    grants,
    is_audited,
    is_open,
    required_scope,
)
from profilemesh.shared.auth.token_store import TokenStatus, TokenStore
from profilemesh.shared.auth.tokens import generate_token, token_digest, token_id_of
from profilemesh.shared.auth.verifier import RemoteVerifier, StoreVerifier, VerdictCache
from profilemesh.shared.channel import create_blocking_channel, create_channel
from profilemesh.shared.errors import InvalidArgument, Unauthenticated
from profilemesh.shared.log.servicer import LogServicer, log_service_binding
from profilemesh.shared.server import ServiceServer, bind, create_server
from profilemesh.shared.service_app import ServiceApp
from profilemesh.shared.settings import AuthSettings, Settings
from tests.store_backends import StoreHarness

# -- tokens -----------------------------------------------------------------------------------


def test_a_token_names_its_id_and_hides_a_long_random_secret() -> None:
    tokens = {generate_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        token_id = token_id_of(token)
        assert token_id is not None and len(token_id) == 16
        assert token.startswith(f"pm_{token_id}_")
        assert len(token) - len(f"pm_{token_id}_") >= 43  # 32 bytes of urlsafe base64
    # Secrets may contain "_" themselves; only the first two separate the parts.
    assert token_id_of("pm_0123456789abcdef_" + "a_b" * 15) == "0123456789abcdef"


def _secret(token: str) -> str:
    return token.split("_", 2)[2]


@pytest.mark.parametrize(
    "text",
    ["", "Bearer", "pm_", "pm_xyz_secret", "xx_0123456789abcdef_" + "a" * 43,
     "pm_0123456789ABCDEF_" + "a" * 43, "pm_0123456789abcdef_short"],
)  # fmt: skip
def test_malformed_tokens_have_no_id(text: str) -> None:
    assert token_id_of(text) is None


def _tokens(stores: StoreHarness, **options: Any) -> TokenStore:
    """A token store over the test's ``tokens`` store on the backend under test."""
    return TokenStore(lambda: stores.open("tokens"), **options)


def test_the_store_keeps_only_the_digest_of_a_token(stores: StoreHarness) -> None:
    with _tokens(stores) as store:
        token, record = store.create("crm-sync", ["events:write", "sources:admin"])
        verdict = store.check(token)
    assert verdict.status is TokenStatus.VALID
    assert verdict.record == record
    assert record.caller().scopes == {"events:write", "sources:admin"}
    rows = stores.open("tokens").read(lambda c: c.execute("SELECT * FROM api_tokens").fetchall())
    stored = repr([tuple(row) for row in rows]).encode()
    if stores.backend == "sqlite":
        stored += b"".join(path.read_bytes() for path in stores.directory.iterdir())
    assert token.encode() not in stored
    assert _secret(token).encode() not in stored
    assert hashlib.sha256(token.encode()).hexdigest() == token_digest(token)
    assert token_digest(token).encode() in stored


def test_a_token_with_a_known_id_but_another_secret_is_unknown(stores: StoreHarness) -> None:
    with _tokens(stores) as store:
        token, record = store.create("a", ["profiles:read"])
        forged = f"pm_{record.token_id}_{_secret(generate_token())}"
        assert store.check(forged).status is TokenStatus.UNKNOWN
        assert store.check(generate_token()).status is TokenStatus.UNKNOWN
        assert store.check("not a token").status is TokenStatus.MALFORMED
        assert store.check(token).status is TokenStatus.VALID


def test_a_revoked_token_is_refused_and_stays_listed_as_inactive(stores: StoreHarness) -> None:
    with _tokens(stores) as store:
        token, record = store.create("a", ["profiles:read"])
        kept, _ = store.create("b", ["profiles:read"])
        revoked = store.revoke(record.token_id)
        again = store.revoke(record.token_id)
        assert revoked.revoked_at is not None and again.revoked_at == revoked.revoked_at
        assert store.check(token).status is TokenStatus.REVOKED
        assert store.check(kept).status is TokenStatus.VALID
        assert [r.name for r in store.tokens()] == ["b"]
        assert {r.name for r in store.tokens(include_inactive=True)} == {"a", "b"}
        with pytest.raises(Exception, match="no token"):
            store.revoke("0000000000000000")


def test_a_token_expires_after_its_time_to_live(stores: StoreHarness) -> None:
    now = [1_000_000.0]
    with _tokens(stores, clock=lambda: now[0]) as store:
        token, record = store.create("temp", ["profiles:read"], ttl_seconds=3600)
        assert record.expires_at == 1_000_000.0 + 3600
        now[0] += 3599
        assert store.check(token).status is TokenStatus.VALID
        now[0] += 1
        assert store.check(token).status is TokenStatus.EXPIRED
        assert store.tokens() == []


def test_new_tokens_need_a_name_and_known_scopes(stores: StoreHarness) -> None:
    with _tokens(stores) as store:
        with pytest.raises(InvalidArgument, match="name"):
            store.create(" ", ["admin"])
        with pytest.raises(InvalidArgument, match="at least one scope"):
            store.create("a", [])
        with pytest.raises(InvalidArgument, match="unknown scopes: profiles:everything"):
            store.create("a", ["profiles:read", "profiles:everything"])
        with pytest.raises(InvalidArgument, match="ttl"):
            store.create("a", ["admin"], ttl_seconds=0)


def test_a_bootstrap_token_is_added_once_and_a_revocation_is_never_undone(
    stores: StoreHarness,
) -> None:
    token = generate_token()
    with _tokens(stores) as store:
        first = store.ensure(token, "bootstrap", [ADMIN])
        assert store.ensure(token, "bootstrap", [ADMIN]) == first
        assert store.check(token).record == first
        store.revoke(first.token_id)
        assert store.ensure(token, "bootstrap", [ADMIN]).revoked_at is not None
        assert store.check(token).status is TokenStatus.REVOKED
        clash = f"pm_{first.token_id}_{_secret(generate_token())}"
        with pytest.raises(Exception, match="another token has the id"):
            store.ensure(clash, "bootstrap", [ADMIN])


def test_a_token_made_by_one_instance_is_verified_by_another_after_a_restart(
    stores: StoreHarness,
) -> None:
    """On the postgres backend a restarted identity pod (or another replica) opens the same
    tokens: nothing lives in the pod's data directory."""
    with _tokens(stores) as first:
        token, record = first.create("crm-sync", ["events:write"])
        old, old_record = first.create("old", ["events:write"])
        first.revoke(old_record.token_id)
    with _tokens(stores) as second:
        assert second.check(token).record == record
        assert second.check(old).status is TokenStatus.REVOKED
        later, later_record = second.create("later", ["profiles:read"])
        with _tokens(stores) as third:  # a replica running beside it
            assert third.check(later).status is TokenStatus.VALID
            third.revoke(later_record.token_id)
        assert second.check(later).status is TokenStatus.REVOKED


# -- scopes -----------------------------------------------------------------------------------


def _every_rpc() -> set[str]:
    """Every method of every service the generated descriptors define."""
    methods = set()
    root = Path(profilemesh.__file__).parent
    for package in ("common", "ingestion", "identity", "features", "scoring", "activation"):
        for module in pkgutil.iter_modules([str(root / package / "v1")]):
            if not module.name.endswith("_pb2"):
                continue
            pb2 = importlib.import_module(f"profilemesh.{package}.v1.{module.name}")
            for service in pb2.DESCRIPTOR.services_by_name.values():
                methods.update(f"/{service.full_name}/{m.name}" for m in service.methods)
    return methods


def test_every_rpc_of_every_service_has_exactly_one_known_scope() -> None:
    rpcs = _every_rpc()
    assert len(rpcs) > 70
    missing = sorted(rpcs - set(METHOD_SCOPES))
    assert not missing, f"give these RPCs a scope in shared/auth/scopes.py: {missing}"
    stale = sorted(set(METHOD_SCOPES) - rpcs)
    assert not stale, f"these scope table entries name no RPC: {stale}"
    assert set(METHOD_SCOPES.values()) <= set(SCOPES)


def test_admin_grants_every_scope_and_unknown_methods_need_admin() -> None:
    assert all(grants([ADMIN], scope) for scope in SCOPES)
    assert grants(["profiles:read"], "profiles:read")
    assert not grants(["profiles:read"], "profiles:write")
    assert required_scope("/profilemesh.x.v1.New/Method") == ADMIN
    assert required_scope("/profilemesh.common.v1.AuthService/CreateToken") == ADMIN
    assert required_scope("/profilemesh.identity.v1.IdentityService/GetProfile") == "profiles:read"


def test_health_and_reflection_are_open_and_internal_chatter_is_not_audited() -> None:
    assert is_open("/grpc.health.v1.Health/Check")
    assert is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_open("/profilemesh.common.v1.LogService/Subscribe")
    assert not is_audited("/grpc.health.v1.Health/Watch")
    assert not is_audited("/profilemesh.common.v1.LogService/Subscribe")
    assert not is_audited("/profilemesh.common.v1.AuthService/VerifyToken")
    assert is_audited("/profilemesh.identity.v1.IdentityService/GetProfile")
    assert is_audited("/profilemesh.common.v1.AuthService/CreateToken")


def test_the_bearer_token_is_read_from_the_authorization_metadata() -> None:
    assert bearer_token([("authorization", "Bearer pm_a_b")]) == "pm_a_b"
    assert bearer_token([("x", "y"), ("authorization", "bearer  pm_a_b ")]) == "pm_a_b"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token(None) is None


# -- the guard on a real server ---------------------------------------------------------------


@dataclass
class Guarded:
    """A server hosting LogService (streaming) and AuditService behind the guard, with tokens
    verified against a store."""

    settings: Settings
    store: TokenStore
    app: ServiceApp
    server: ServiceServer
    target: str

    def token(self, *scopes: str, name: str = "t") -> str:
        token, _ = self.store.create(name, list(scopes))
        return token


def _auth_settings(tmp_path: Path, **auth: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", auth=AuthSettings(enabled=True, **auth))  # type: ignore[arg-type]


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Guarded]:
    settings = _auth_settings(tmp_path)
    store = TokenStore(tmp_path / "tokens.sqlite").open()
    app = ServiceApp(
        name="probe",
        bindings=[
            log_service_binding(LogServicer()),
            bind(auth_service_pb2, auth_service_pb2_grpc, "AuthService", _CallerEcho(store)),
        ],
        token_verifier=StoreVerifier(store),
    )
    guard_app(app, settings)
    server, port = create_server(app.bindings, settings, port=0)
    await app.start()
    await server.start()
    yield Guarded(settings, store, app, server, f"127.0.0.1:{port}")
    await server.stop(0)
    await app.close()
    store.close()


class _CallerEcho(AuthServicer):
    """ListTokens answers with the current caller's name, to show servicers see it."""

    async def ListTokens(self, request, context):  # type: ignore[no-untyped-def]
        return auth_service_pb2.ListTokensResponse(
            tokens=[auth_service_pb2.ApiToken(name=current_caller().name)]
        )


async def _code(call: object) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


async def test_calls_without_a_valid_token_are_unauthenticated(guarded: Guarded) -> None:
    revoked = guarded.token("audit:read")
    guarded.store.revoke(token_id_of(revoked) or "")
    async with grpc.aio.insecure_channel(guarded.target) as channel:
        audit = audit_service_pb2_grpc.AuditServiceStub(channel)
        logs = log_service_pb2_grpc.LogServiceStub(channel)
        for token in (None, "junk", generate_token(), revoked):
            request = audit_service_pb2.ListAuditEntriesRequest()
            unary = audit.ListAuditEntries(request, metadata=_metadata(token))
            assert await _code(unary) == grpc.StatusCode.UNAUTHENTICATED, token
            stream = logs.Subscribe(
                log_service_pb2.SubscribeRequest(stream="events"), metadata=_metadata(token)
            )
            assert await _code(stream) == grpc.StatusCode.UNAUTHENTICATED, token
        try:
            await audit.ListAuditEntries(audit_service_pb2.ListAuditEntriesRequest())
        except grpc.aio.AioRpcError as error:
            assert "Bearer" in (error.details() or "")


async def test_a_token_without_the_scope_is_denied_naming_the_scope(guarded: Guarded) -> None:
    token = guarded.token("profiles:read", "logs:read")
    async with grpc.aio.insecure_channel(guarded.target) as channel:
        audit = audit_service_pb2_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await audit.ListAuditEntries(
                audit_service_pb2.ListAuditEntriesRequest(), metadata=_metadata(token)
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "audit:read" in (denied.value.details() or "")
        # The streaming method it has the scope for goes through to the servicer.
        logs = log_service_pb2_grpc.LogServiceStub(channel)
        stream = logs.Subscribe(
            log_service_pb2.SubscribeRequest(stream="nothing"), metadata=_metadata(token)
        )
        assert await _code(stream) == grpc.StatusCode.NOT_FOUND


async def test_the_right_scope_or_admin_lets_a_call_through_as_its_caller(
    guarded: Guarded,
) -> None:
    async with grpc.aio.insecure_channel(guarded.target) as channel:
        audit = audit_service_pb2_grpc.AuditServiceStub(channel)
        for token in (guarded.token("audit:read"), guarded.token(ADMIN)):
            response = await audit.VerifyAuditChain(
                audit_service_pb2.VerifyAuditChainRequest(), metadata=_metadata(token)
            )
            assert response.chain_valid
        auth = auth_service_pb2_grpc.AuthServiceStub(channel)
        echoed = await auth.ListTokens(
            auth_service_pb2.ListTokensRequest(),
            metadata=_metadata(guarded.token(ADMIN, name="ops")),
        )
        assert [t.name for t in echoed.tokens] == ["ops"]
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert current_caller() is ANONYMOUS


async def test_the_guard_records_who_called_what_and_how_it_ended(guarded: Guarded) -> None:
    reader = guarded.token("audit:read", name="auditor")
    weak = guarded.token("logs:read", name="weak")
    async with grpc.aio.insecure_channel(guarded.target) as channel:
        audit = audit_service_pb2_grpc.AuditServiceStub(channel)
        request = audit_service_pb2.ListAuditEntriesRequest()
        assert await _code(audit.ListAuditEntries(request)) == grpc.StatusCode.UNAUTHENTICATED
        denied = audit.ListAuditEntries(request, metadata=_metadata(weak))
        assert await _code(denied) == grpc.StatusCode.PERMISSION_DENIED
        logs = log_service_pb2_grpc.LogServiceStub(channel)
        await _code(logs.GetOffsets(log_service_pb2.GetOffsetsRequest(), metadata=_metadata(weak)))
        listed = await audit.ListAuditEntries(request, metadata=_metadata(reader))
    seen = [(e.token_name, e.method.rsplit("/", 1)[-1], e.status_code) for e in listed.entries]
    # Newest first; LogService calls are not recorded; this listing is not done yet.
    assert seen == [
        ("weak", "ListAuditEntries", "PERMISSION_DENIED"),
        ("anonymous", "ListAuditEntries", "UNAUTHENTICATED"),
    ]
    entry = listed.entries[0]
    assert entry.token_id == token_id_of(weak)
    assert entry.service == "probe"
    assert entry.peer.startswith("ipv4:127.0.0.1:")
    assert entry.time.seconds > 0 and entry.hash


async def test_channels_of_the_mesh_send_this_process_s_token(
    guarded: Guarded, tmp_path: Path
) -> None:
    token = guarded.token("audit:read")
    request = audit_service_pb2.VerifyAuditChainRequest()
    configured = guarded.settings.model_copy(
        update={"auth": AuthSettings(enabled=True, token=token)}
    )
    async with create_channel(guarded.target, configured) as channel:
        assert await audit_service_pb2_grpc.AuditServiceStub(channel).VerifyAuditChain(request)
    # Without a configured token, the local mesh's admin.token file is sent.
    from_file = Settings(data_dir=tmp_path / "local")
    assert client_token(from_file) is None
    admin_token_path(from_file).parent.mkdir(parents=True)
    admin_token_path(from_file).write_text(token + "\n")
    assert client_token(from_file) == token
    async with create_channel(guarded.target, from_file) as channel:
        assert await audit_service_pb2_grpc.AuditServiceStub(channel).VerifyAuditChain(request)
    # Blocking channels (worker threads) send it too.
    blocking = create_blocking_channel(guarded.target, configured)
    try:
        stub = audit_service_pb2_grpc.AuditServiceStub(blocking)
        assert (await asyncio.to_thread(stub.VerifyAuditChain, request)).chain_valid
    finally:
        blocking.close()


async def test_with_auth_off_calls_go_through_and_are_recorded_as_anonymous(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", auth=AuthSettings(enabled=False))
    app = ServiceApp(name="probe", bindings=[log_service_binding(LogServicer())])
    guard_app(app, settings)
    server, port = create_server(app.bindings, settings, port=0)
    await app.start()
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            audit = audit_service_pb2_grpc.AuditServiceStub(channel)
            await audit.VerifyAuditChain(audit_service_pb2.VerifyAuditChainRequest())
            listed = await audit.ListAuditEntries(audit_service_pb2.ListAuditEntriesRequest())
    finally:
        await server.stop(0)
        await app.close()
    assert [(e.token_name, e.token_id, e.status_code) for e in listed.entries] == [
        ("anonymous", "", "OK")
    ]


# -- verifying through identity ---------------------------------------------------------------


class _CountingStore(TokenStore):
    checks = 0

    def check(self, token: str):  # type: ignore[no-untyped-def]
        self.checks += 1
        return super().check(token)


@pytest.fixture
async def identity_like(tmp_path: Path) -> AsyncIterator[tuple[str, _CountingStore]]:
    """A server hosting AuthService over a store, guarded like identity."""
    settings = _auth_settings(tmp_path)
    store = _CountingStore(tmp_path / "tokens.sqlite").open()
    app = ServiceApp(
        name="identity",
        bindings=[
            bind(auth_service_pb2, auth_service_pb2_grpc, "AuthService", AuthServicer(store))
        ],
        token_verifier=StoreVerifier(store),
    )
    guard_app(app, settings)
    server, port = create_server(app.bindings, settings, port=0)
    await app.start()
    await server.start()
    yield f"127.0.0.1:{port}", store
    await server.stop(0)
    await app.close()
    store.close()


def _remote(target: str, token: str, tmp_path: Path, **options: object) -> RemoteVerifier:
    settings = _auth_settings(tmp_path, token=token)
    return RemoteVerifier(lambda: create_channel(target, settings), **options)  # type: ignore[arg-type]


async def test_other_services_cache_what_identity_verified(
    identity_like: tuple[str, _CountingStore], tmp_path: Path
) -> None:
    target, store = identity_like
    service_token, _ = store.create("features", ["tokens:verify"])
    caller_token, record = store.create("app", ["profiles:read"])
    verifier = _remote(target, service_token, tmp_path, cache_seconds=30)
    try:
        callers = await asyncio.gather(*(verifier.verify(caller_token) for _ in range(20)))
        assert {c.token_id for c in callers} == {record.token_id}
        assert callers[0].scopes == {"profiles:read"}
        service_checks = 1  # identity verified the service's own token once per call
        assert store.checks == 2 * service_checks  # one shared lookup for twenty calls
        store.revoke(record.token_id)
        assert (await verifier.verify(caller_token)).token_id == record.token_id  # cached
        with pytest.raises(Unauthenticated, match="not of the form"):
            await verifier.verify("junk")  # refused without asking identity
        assert store.checks == 2
    finally:
        await verifier.close()
    uncached = _remote(target, service_token, tmp_path, cache_seconds=0)
    try:
        with pytest.raises(Unauthenticated, match="revoked"):
            await uncached.verify(caller_token)
    finally:
        await uncached.close()


async def test_a_service_whose_own_token_identity_refuses_answers_unavailable(
    identity_like: tuple[str, _CountingStore], tmp_path: Path
) -> None:
    target, store = identity_like
    weak, _ = store.create("features", ["profiles:read"])
    caller_token, _ = store.create("app", ["profiles:read"])
    verifier = _remote(target, weak, tmp_path, cache_seconds=30)
    try:
        with pytest.raises(Exception, match="refused this service's own token") as refused:
            await verifier.verify(caller_token)
        assert type(refused.value).__name__ == "Unavailable"
    finally:
        await verifier.close()


def test_the_verdict_cache_forgets_expired_and_least_recently_used_entries() -> None:
    now = [0.0]
    cache = VerdictCache(max_entries=2, clock=lambda: now[0])
    cache.put("a", TokenStatus.REVOKED, 5)
    cache.put("b", ANONYMOUS, 10)
    assert cache.get("a") is TokenStatus.REVOKED
    cache.put("c", ANONYMOUS, 10)  # b is least recently used
    assert cache.get("b") is None and len(cache) == 2
    now[0] = 6
    assert cache.get("a") is None and cache.get("c") is ANONYMOUS


# -- the audit log ----------------------------------------------------------------------------


def _record(n: int, **fields: object) -> AuditRecord:
    values: dict[str, object] = {
        "time_us": 1_700_000_000_000_000 + n,
        "service": "identity",
        "method": f"/profilemesh.identity.v1.IdentityService/M{n}",
        "token_id": "0123456789abcdef",
        "token_name": "ops",
        "peer": "ipv4:127.0.0.1:1",
        "status_code": "OK",
        "duration_us": n,
    }
    values.update(fields)
    return AuditRecord(**values)  # type: ignore[arg-type]


def _audit_log(stores: StoreHarness, **options: Any) -> AuditLog:
    """An audit log over the test's ``audit`` store on the backend under test."""
    return AuditLog(lambda: stores.open("audit"), "identity", **options)


def _raw_sql(stores: StoreHarness, statement: str) -> None:
    """Run ``statement`` in the audit store's own dialect, as someone with the file or a
    database login could: around the service."""
    store = stores.open("audit")
    with store.transaction() as tx:
        if stores.backend == "postgres":
            tx.connection.execute(statement)
        else:
            tx.execute(statement)


@pytest.fixture
def audit(stores: StoreHarness) -> Iterator[AuditLog]:
    log = _audit_log(stores, flush_interval=0.05)
    log.open()
    yield log
    log.close()


def test_audit_entries_are_chained_and_listed_newest_first(audit: AuditLog) -> None:
    for n in range(1, 6):
        audit.record(_record(n, token_id="t2" if n % 2 == 0 else "t1"))
    assert audit.flush()
    entries = audit.query(AuditQuery(page_size=10))
    assert [e.sequence for e in entries] == [5, 4, 3, 2, 1]
    assert [e.record.duration_us for e in entries] == [5, 4, 3, 2, 1]
    assert entries[0].record == _record(5, token_id="t1")
    assert [e.sequence for e in audit.query(AuditQuery(token_id="t2"))] == [4, 2]
    assert [e.sequence for e in audit.query(AuditQuery(before_sequence=3))] == [2, 1]
    since = _record(4).time_us
    assert [e.sequence for e in audit.query(AuditQuery(since_us=since))] == [5, 4]
    prefix = "/profilemesh.identity.v1.IdentityService/M3"
    assert [e.sequence for e in audit.query(AuditQuery(method_prefix=prefix))] == [3]
    check = audit.verify_chain()
    assert check.valid and check.entries_checked == 5


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_entries SET status_code = 'OK'",
        "DELETE FROM audit_entries",
        "DELETE FROM audit_entries WHERE sequence = 1",
    ],
)
def test_the_audit_table_refuses_updates_and_deletes(
    audit: AuditLog, stores: StoreHarness, statement: str
) -> None:
    audit.record(_record(1))
    assert audit.flush()
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only"):
        _raw_sql(stores, statement)
    assert audit.verify_chain().entries_checked == 1


def test_the_audit_table_refuses_truncation_on_postgres(
    audit: AuditLog, stores: StoreHarness
) -> None:
    if stores.backend != "postgres":
        pytest.skip("SQLite has no TRUNCATE (a DELETE without WHERE is refused above)")
    audit.record(_record(1))
    assert audit.flush()
    with pytest.raises(psycopg.Error, match="append-only"):
        _raw_sql(stores, "TRUNCATE audit_entries")
    assert audit.verify_chain().entries_checked == 1


def test_an_entry_changed_behind_the_triggers_breaks_the_chain(
    audit: AuditLog, stores: StoreHarness
) -> None:
    for n in range(1, 5):
        audit.record(_record(n))
    assert audit.flush()
    if stores.backend == "postgres":
        _raw_sql(stores, "DROP TRIGGER audit_entries_no_change ON audit_entries")
    else:
        _raw_sql(stores, "DROP TRIGGER audit_entries_no_update")
    _raw_sql(stores, "UPDATE audit_entries SET token_name = 'someone else' WHERE sequence = 3")
    check = audit.verify_chain()
    assert not check.valid and check.first_invalid_sequence == 3


def test_a_dropped_trigger_is_back_when_the_log_opens_again(stores: StoreHarness) -> None:
    if stores.backend == "postgres":
        drop = "DROP TRIGGER audit_entries_no_change ON audit_entries"
    else:
        drop = "DROP TRIGGER audit_entries_no_delete"
    log = _audit_log(stores)
    log.open()
    log.record(_record(1))
    log.close()
    _raw_sql(stores, drop)
    log.open()
    log.close()
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only"):
        _raw_sql(stores, "DELETE FROM audit_entries")


def test_the_chain_continues_across_restarts(stores: StoreHarness) -> None:
    for _ in range(2):
        log = _audit_log(stores)
        log.open()
        log.record(_record(1))
        log.close()
    check = _audit_log(stores).verify_chain()
    assert check.valid and check.entries_checked == 2


def test_replicas_sharing_a_store_append_to_one_chain(stores: StoreHarness) -> None:
    replicas = [_audit_log(stores, flush_interval=0.01) for _ in range(2)]
    for replica in replicas:
        replica.open()
    for n in range(1, 41):
        replicas[n % 2].record(_record(n))
        if n % 7 == 0:
            assert replicas[n % 2].flush()
    for replica in replicas:
        replica.close()
    check = _audit_log(stores).verify_chain()
    assert check.valid and check.entries_checked == 40
    listed = _audit_log(stores).query(AuditQuery(page_size=100))
    assert sorted(e.record.duration_us for e in listed) == list(range(1, 41))


def test_entries_beyond_the_pending_limit_are_dropped_and_the_gap_is_marked(
    stores: StoreHarness,
) -> None:
    log = _audit_log(stores, max_pending=3)
    for n in range(5):  # not open yet: nothing is written, the queue fills up
        log.record(_record(n))
    log.open()
    log.close()
    entries = log.query(AuditQuery())
    assert [e.record.status_code for e in reversed(entries)] == ["DATA_LOSS", "OK", "OK", "OK"]
    assert "2 entries dropped" in entries[-1].record.method
    assert log.verify_chain().valid


def test_a_log_file_that_does_not_exist_reads_as_empty(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite", "identity")
    assert log.query(AuditQuery()) == []
    assert log.verify_chain().entries_checked == 0
    assert not (tmp_path / "audit.sqlite").exists()


# -- settings, the local mesh's token, the command line ---------------------------------------


def test_auth_settings_survive_the_trip_to_a_child_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for enabled in (True, False):
        original = Settings(auth=AuthSettings(enabled=enabled, token="pm_x", cache_seconds=2.5))
        env = original.to_env()
        assert "PROFILEMESH_AUTH__BOOTSTRAP_TOKEN" not in env
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert Settings().auth == original.auth


def test_auth_is_on_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROFILEMESH_AUTH__ENABLED", raising=False)
    assert Settings().auth.enabled
    monkeypatch.setenv("PROFILEMESH_AUTH__ENABLED", "false")
    assert not Settings().auth.enabled


def test_a_local_mesh_gets_one_admin_token_kept_for_its_owner(tmp_path: Path) -> None:
    settings = _auth_settings(tmp_path)
    prepared, path = prepare_local_admin(settings)
    assert path == tmp_path / "data" / "admin.token"
    token = path.read_text().strip()
    assert token_id_of(token) is not None
    assert prepared.auth.token == prepared.auth.bootstrap_token == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # A restart keeps the token the CLI already uses.
    again, _ = prepare_local_admin(settings)
    assert again.auth.token == token
    off = Settings(data_dir=tmp_path / "off", auth=AuthSettings(enabled=False))
    assert prepare_local_admin(off) == (off, None)
    configured = _auth_settings(tmp_path, token="pm_given")
    assert prepare_local_admin(configured) == (configured, None)


def test_tokens_can_be_made_offline_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROFILEMESH_DATA_DIR", str(tmp_path / "data"))
    command = ["tokens", "create", "--offline", "--name", "ci", "--scopes", "events:write"]
    assert main(command) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token_id_of(token) is not None and "not shown again" in err
    assert main(["tokens", "list", "--offline"]) == 0
    listed = capsys.readouterr().out
    assert f"{token_id_of(token)}  ci" in listed and token not in listed
    assert main(["tokens", "revoke", "--offline", token_id_of(token) or ""]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["tokens", "create", "--offline", "--name", "x", "--scopes", "nope"]) == 1
    assert "unknown scopes: nope" in capsys.readouterr().err
    path = tmp_path / "data" / "identity" / "tokens.sqlite"
    with TokenStore(path) as store:
        assert store.check(token).status is TokenStatus.REVOKED


def test_audit_times_are_relative_or_iso_and_utc_unless_they_say() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_when("90m", now) == datetime(2025, 6, 1, 10, 30, tzinfo=UTC)
    assert parse_when("2d", now) == datetime(2025, 5, 30, 12, 0, tzinfo=UTC)
    assert parse_when("2025-05-01T08:00", now) == datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
    assert parse_when("2025-05-01T08:00+02:00", now) == datetime(2025, 5, 1, 6, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="cannot read the time"):
        parse_when("yesterday", now)
