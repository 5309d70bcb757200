"""End to end with every protection on: the five services as ``profilemesh up`` runs them, with
mutual TLS and API tokens. Events flow through ingestion, identity, features, scoring and
activation over authenticated, encrypted links; each caller gets what its scopes allow and
nothing more; a deletion is carried out by the services reporting to identity over those same
links; and the audit log says who did what."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from profilemesh.activation.v1 import activation_service_pb2 as activation_pb2
from profilemesh.activation.v1 import activation_service_pb2_grpc
from profilemesh.common.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    auth_service_pb2,
    auth_service_pb2_grpc,
    identifier_pb2,
    job_pb2,
)
from profilemesh.identity.v1 import identity_service_pb2 as identity_pb2
from profilemesh.identity.v1 import identity_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.certs_command import create_certificates
from profilemesh.services.mesh import Mesh
from profilemesh.shared.auth.tokens import generate_token
from profilemesh.shared.channel import create_channel
from profilemesh.shared.settings import (
    SERVICE_NAMES,
    AuthSettings,
    Endpoint,
    Endpoints,
    Settings,
    TlsSettings,
)
from tests.conftest import free_port

DANA = identifier_pb2.Identifier(type="user_id", value="u-dana-secure")


@pytest.fixture(scope="module")
def secure_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    certs = create_certificates(tmp_path_factory.mktemp("certs"))
    admin = generate_token()
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("secure-mesh") / "data",
        grace_seconds=2.0,
        services=Endpoints(**{name: Endpoint(port=free_port()) for name in SERVICE_NAMES}),
        tls=TlsSettings(
            enabled=True, ca_file=certs.ca_file, cert_file=certs.cert_file, key_file=certs.key_file
        ),
        auth=AuthSettings(enabled=True, token=admin, bootstrap_token=admin),
    )
    mesh = Mesh(settings)
    try:
        mesh.start()
        asyncio.run(mesh.wait_until_serving(120))
        yield settings
    finally:
        mesh.stop()


def as_caller(settings: Settings, token: str | None) -> Settings:
    """The same mesh, called with ``token`` (None: no token at all)."""
    return settings.model_copy(update={"auth": AuthSettings(enabled=True, token=token)})


async def new_token(settings: Settings, name: str, *scopes: str) -> str:
    async with create_channel(settings.services.identity.target, settings) as channel:
        created = await auth_service_pb2_grpc.AuthServiceStub(channel).CreateToken(
            auth_service_pb2.CreateTokenRequest(name=name, scopes=list(scopes))
        )
    token: str = created.token
    return token


async def test_a_person_flows_through_the_secured_mesh_and_can_be_erased(
    secure_mesh: Settings,
) -> None:
    writer = as_caller(secure_mesh, await new_token(secure_mesh, "web-backend", "events:write"))
    reader = as_caller(secure_mesh, await new_token(secure_mesh, "support-app", "profiles:read"))
    privacy = as_caller(secure_mesh, await new_token(secure_mesh, "dpo-tool", "privacy:admin"))

    signin = event_pb2.Event(user_id=DANA.value, anonymous_id="anon-dana-laptop")
    signin.identify.traits.update({"email": "dana@example.com", "consent": {"email": True}})
    order = event_pb2.Event(user_id=DANA.value)
    order.track.event = "Order Completed"
    order.track.properties.update({"revenue": 42.0})
    async with create_channel(secure_mesh.services.ingestion.target, writer) as channel:
        sent = await ingestion_service_pb2_grpc.IngestionServiceStub(channel).SendEvents(
            ingestion_service_pb2.SendEventsRequest(events=[signin, order])
        )
    assert sent.accepted_count == 2

    # Scopes: the writer cannot read what it wrote; nobody without a token gets anything.
    async with create_channel(secure_mesh.services.activation.target, writer) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await activation_service_pb2_grpc.ActivationServiceStub(channel).GetUnifiedProfile(
                activation_pb2.GetUnifiedProfileRequest(identifier=DANA)
            )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "profiles:read" in (denied.value.details() or "")
    async with create_channel(
        secure_mesh.services.activation.target, as_caller(secure_mesh, None)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await activation_service_pb2_grpc.ActivationServiceStub(channel).GetUnifiedProfile(
                activation_pb2.GetUnifiedProfileRequest(identifier=DANA)
            )
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Through identity and features (over mTLS, with the services' token) to activation.
    deadline = time.monotonic() + 60
    async with create_channel(secure_mesh.services.activation.target, reader) as channel:
        activation = activation_service_pb2_grpc.ActivationServiceStub(channel)
        while True:
            try:
                unified = await activation.GetUnifiedProfile(
                    activation_pb2.GetUnifiedProfileRequest(identifier=DANA)
                )
                orders = {f.name: f for f in unified.profile.features}.get("orders_lifetime")
                if orders is not None and orders.int64_value == 1:
                    break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND, error
            assert time.monotonic() < deadline, "the profile never reached activation"
            await asyncio.sleep(0.2)
    kinds = {i.identifier.type for i in unified.profile.identities}
    assert kinds >= {"user_id", "anonymous_id", "email"}
    assert [(c.purpose, c.granted) for c in unified.profile.consents] == [("email", True)]

    # Erasure: features, scoring and activation report to identity over the secured links.
    async with create_channel(secure_mesh.services.identity.target, privacy) as channel:
        identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
        job = (
            await identity.DeleteProfile(
                identity_pb2.DeleteProfileRequest(identifier=DANA, reason="ticket 77")
            )
        ).job
        while job.state == job_pb2.JOB_STATE_RUNNING:
            assert time.monotonic() < deadline + 60, job
            await asyncio.sleep(0.2)
            job = (
                await identity.GetDeletion(identity_pb2.GetDeletionRequest(job_id=job.job_id))
            ).job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job

    # The audit log of activation names the reader's token for the profile reads.
    async with create_channel(secure_mesh.services.activation.target, secure_mesh) as channel:
        audit = audit_service_pb2_grpc.AuditServiceStub(channel)
        entries = (
            await audit.ListAuditEntries(
                audit_service_pb2.ListAuditEntriesRequest(
                    method_prefix="/profilemesh.activation.v1.ActivationService/GetUnifiedProfile"
                )
            )
        ).entries
        by_token = {(e.token_name, e.status_code) for e in entries}
        assert ("support-app", "OK") in by_token
        assert ("web-backend", "PERMISSION_DENIED") in by_token
        assert (
            await audit.VerifyAuditChain(audit_service_pb2.VerifyAuditChainRequest())
        ).chain_valid
