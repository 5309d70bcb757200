"""Mutual TLS: the mesh talks only to holders of a certificate from its CA, services included.

The five services run as ``profilemesh up`` runs them (one process each, settings handed down
in the environment), with certificates from ``profilemesh certs create``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from profilemesh.client import Client
from profilemesh.common.v1 import identifier_pb2, profile_pb2
from profilemesh.identity.v1 import identity_service_pb2 as identity_pb2
from profilemesh.identity.v1 import identity_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.certs_command import CertificateSet, create_certificates
from profilemesh.services.cli import main
from profilemesh.services.mesh import Mesh
from profilemesh.shared.channel import create_blocking_channel, create_channel
from profilemesh.shared.health_client import UNREACHABLE, check_health
from profilemesh.shared.server import ListenError, create_server
from profilemesh.shared.settings import SERVICE_NAMES, Endpoint, Endpoints, Settings, TlsSettings
from profilemesh.shared.tls import channel_credentials
from tests.conftest import free_port


def tls_settings(files: CertificateSet, **overrides: object) -> TlsSettings:
    return TlsSettings(
        enabled=True,
        ca_file=files.ca_file,
        cert_file=files.cert_file,
        key_file=files.key_file,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def mesh_certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return create_certificates(tmp_path_factory.mktemp("mesh-certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    """A complete, valid set from a CA the mesh has never heard of."""
    return create_certificates(tmp_path_factory.mktemp("other-certs"))


@pytest.fixture(scope="module")
def tls_mesh(
    tmp_path_factory: pytest.TempPathFactory, mesh_certs: CertificateSet
) -> Iterator[Settings]:
    """The five services with mutual TLS on, started and awaited by the supervisor."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("tls-mesh") / "data",
        grace_seconds=2.0,
        services=Endpoints(**{name: Endpoint(port=free_port()) for name in SERVICE_NAMES}),
        tls=tls_settings(mesh_certs),
    )
    mesh = Mesh(settings)
    try:
        mesh.start()
        # The supervisor's own health checks must pass the handshake for this to return.
        asyncio.run(mesh.wait_until_serving(120))
        yield settings
    finally:
        mesh.stop()


async def test_an_event_sent_with_a_mesh_certificate_reaches_identity(tls_mesh: Settings) -> None:
    # Identity follows ingestion's log over its own mutual TLS connection.
    event = event_pb2.Event(user_id="tls-user-1")
    event.identify.traits.update({"email": "tls@example.com"})
    async with create_channel(tls_mesh.services.ingestion.target, tls_mesh) as channel:
        ingestion = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        sent = await ingestion.SendEvents(ingestion_service_pb2.SendEventsRequest(events=[event]))
    assert sent.accepted_count == 1

    profile = await _profile_eventually(tls_mesh, "user_id", "tls-user-1")
    assert profile.traits["email"] == "tls@example.com"


def test_the_python_client_sends_with_a_mesh_certificate(tls_mesh: Settings) -> None:
    with Client(
        tls_mesh.services.ingestion.target,
        sync_mode=True,
        credentials=channel_credentials(tls_mesh.tls),
    ) as client:
        client.identify("tls-user-2", {"email": "client@example.com"})
    profile = asyncio.run(_profile_eventually(tls_mesh, "user_id", "tls-user-2"))
    assert profile.traits["email"] == "client@example.com"


async def test_health_checks_answer_over_tls(tls_mesh: Settings) -> None:
    for name in SERVICE_NAMES:
        assert await check_health(tls_mesh.services.of(name).target, tls_mesh) == "SERVING"
    plain = tls_mesh.model_copy(update={"tls": TlsSettings()})
    assert await check_health(tls_mesh.services.ingestion.target, plain) == UNREACHABLE


def test_blocking_channels_speak_tls_too(tls_mesh: Settings) -> None:
    with create_blocking_channel(tls_mesh.services.features.target, tls_mesh) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("client", ["plaintext", "no certificate", "certificate of another CA"])
async def test_clients_without_a_mesh_certificate_are_refused_at_the_handshake(
    tls_mesh: Settings, other_certs: CertificateSet, client: str
) -> None:
    target = tls_mesh.services.ingestion.target
    ca = tls_mesh.tls.ca_file.read_bytes()  # type: ignore[union-attr]
    if client == "plaintext":
        channel = grpc.aio.insecure_channel(target)
    elif client == "no certificate":
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca))
    else:
        credentials = grpc.ssl_channel_credentials(
            ca,
            private_key=other_certs.key_file.read_bytes(),
            certificate_chain=other_certs.cert_file.read_bytes(),
        )
        channel = grpc.aio.secure_channel(target, credentials)
    async with channel:
        ingestion = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ingestion.SendEvents(
                ingestion_service_pb2.SendEventsRequest(events=[event_pb2.Event(user_id="x")]),
                timeout=10,
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_server_whose_certificate_lacks_the_dialled_name_is_refused(
    tls_mesh: Settings,
) -> None:
    elsewhere = tls_mesh.model_copy(
        update={
            "tls": tls_mesh.tls.model_copy(update={"server_name_override": "elsewhere.example"})
        }
    )
    assert await check_health(tls_mesh.services.identity.target, elsewhere) == UNREACHABLE
    by_service_name = tls_mesh.model_copy(
        update={"tls": tls_mesh.tls.model_copy(update={"server_name_override": "identity"})}
    )
    assert await check_health(tls_mesh.services.identity.target, by_service_name) == "SERVING"


async def _profile_eventually(
    settings: Settings, kind: str, value: str, timeout: float = 30
) -> profile_pb2.UnifiedProfile:
    async with create_channel(settings.services.identity.target, settings) as channel:
        identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
        deadline = asyncio.get_running_loop().time() + timeout
        request = identity_pb2.GetProfileRequest(
            identifier=identifier_pb2.Identifier(type=kind, value=value)
        )
        while True:
            try:
                response = await identity.GetProfile(request)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                assert asyncio.get_running_loop().time() < deadline, f"{kind}:{value} not found"
                await asyncio.sleep(0.1)
            else:
                profile: profile_pb2.UnifiedProfile = response.profile
                return profile


async def test_a_taken_port_is_still_a_listen_error_with_tls(
    mesh_certs: CertificateSet, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, tls=tls_settings(mesh_certs))
    first, port = create_server([], settings, port=0)
    with pytest.raises(ListenError, match=str(port)):
        create_server([], settings, port=port)
    del first


def test_tls_needs_all_three_files_naming_each_missing_one(mesh_certs: CertificateSet) -> None:
    with pytest.raises(ValidationError) as error:
        TlsSettings(enabled=True, ca_file=mesh_certs.ca_file)
    message = str(error.value)
    assert "tls.cert_file (PROFILEMESH_TLS__CERT_FILE) is not set" in message
    assert "tls.key_file (PROFILEMESH_TLS__KEY_FILE) is not set" in message
    assert "tls.ca_file" not in message


def test_tls_files_that_do_not_exist_are_named(
    mesh_certs: CertificateSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in (
        CertificateSet(
            ca_file=mesh_certs.ca_file,
            ca_key_file=mesh_certs.ca_key_file,
            cert_file=tmp_path / "missing.pem",
            key_file=mesh_certs.key_file,
        )
        .environment()
        .items()
    ):
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=r"tls\.cert_file .*missing\.pem is not a file"):
        Settings()


def test_tls_off_needs_no_files() -> None:
    assert not TlsSettings().enabled


def test_tls_settings_reach_child_processes(
    mesh_certs: CertificateSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Settings(tls=tls_settings(mesh_certs, server_name_override="identity"))
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings().tls == original.tls


def test_certs_create_writes_a_ca_and_a_mesh_certificate_for_every_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "create", "--out", str(out), "--hosts", "cdp.internal,10.1.2.3"]) == 0

    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    mesh = x509.load_pem_x509_certificate((out / "mesh.pem").read_bytes())
    mesh.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not mesh.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = mesh.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    names = mesh.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {
        "localhost",
        "ingestion",
        "identity",
        "features",
        "scoring",
        "activation",
        "profilemesh-ingestion",
        "profilemesh-identity",
        "profilemesh-features",
        "profilemesh-scoring",
        "profilemesh-activation",
        "cdp.internal",
    }
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    assert stat.S_IMODE(os.stat(out / "ca-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "mesh-key.pem").st_mode) == 0o600

    printed = capsys.readouterr().out
    assert "export PROFILEMESH_TLS__ENABLED=true" in printed
    for variable, file in (
        ("CA_FILE", "ca.pem"),
        ("CERT_FILE", "mesh.pem"),
        ("KEY_FILE", "mesh-key.pem"),
    ):
        assert f"export PROFILEMESH_TLS__{variable}={out.resolve() / file}" in printed


def test_certs_create_never_overwrites_a_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_certificates(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    assert main(["certs", "create", "--out", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ca.pem").read_bytes() == before
