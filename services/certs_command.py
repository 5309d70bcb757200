"""``profilemesh certs create``: a development CA and one certificate for the whole mesh.

::

    profilemesh certs create --out DIR [--hosts h1,h2,...] [--days N]

Mutual TLS needs a CA that every service trusts and a certificate each service shows as server
and as client. For development and small deployments one certificate serves all five: its
names cover the default endpoints (``localhost``, ``127.0.0.1``, ``::1``), the service names
and their ``profilemesh-<service>`` forms (how Kubernetes Services are usually called), plus
any ``--hosts``. Keys are written readable by their owner only. Production deployments bring
certificates from their own CA; the settings take any PEM files.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from profilemesh.shared.settings import SERVICE_NAMES

DEFAULT_DAYS = 365
# Certificates start a little in the past, so a peer whose clock runs behind accepts them.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateSet:
    """The files ``certs create`` writes: the CA and the mesh's certificate, each with its key."""

    ca_file: Path
    ca_key_file: Path
    cert_file: Path
    key_file: Path

    def environment(self) -> dict[str, str]:
        """The ``PROFILEMESH_TLS__*`` variables that turn mutual TLS on with these files."""
        return {
            "PROFILEMESH_TLS__ENABLED": "true",
            "PROFILEMESH_TLS__CA_FILE": str(self.ca_file),
            "PROFILEMESH_TLS__CERT_FILE": str(self.cert_file),
            "PROFILEMESH_TLS__KEY_FILE": str(self.key_file),
        }


def default_hosts() -> list[str]:
    """The names every mesh certificate carries: loopback, and each service's plain and
    ``profilemesh-`` prefixed name."""
    return [
        "localhost",
        "127.0.0.1",
        "::1",
        *SERVICE_NAMES,
        *(f"profilemesh-{name}" for name in SERVICE_NAMES),
    ]


def create_certificates(
    out: Path, hosts: Sequence[str] = (), *, days: int = DEFAULT_DAYS
) -> CertificateSet:
    """Write a new CA and a mesh certificate signed by it into ``out`` (created if needed);
    ``hosts`` are names or IP addresses added to the default ones. Existing files are never
    overwritten: :class:`FileExistsError`."""
    if days < 1:
        raise ValueError("days must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    files = CertificateSet(
        ca_file=out / "ca.pem",
        ca_key_file=out / "ca-key.pem",
        cert_file=out / "mesh.pem",
        key_file=out / "mesh-key.pem",
    )
    for path in (files.ca_file, files.ca_key_file, files.cert_file, files.key_file):
        if path.exists():
            raise FileExistsError(f"{path} already exists; remove it or choose another --out")
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key, now - _CLOCK_SKEW, not_after)
    mesh_key = ec.generate_private_key(ec.SECP256R1())
    names = _unique([*default_hosts(), *hosts])
    mesh = _mesh_certificate(mesh_key, ca, ca_key, names, now - _CLOCK_SKEW, not_after)
    _write(files.ca_file, ca.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write(files.ca_key_file, _private_pem(ca_key), mode=0o600)
    _write(files.cert_file, mesh.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write(files.key_file, _private_pem(mesh_key), mode=0o600)
    return files


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, not_before: datetime.datetime, not_after: datetime.datetime
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "profilemesh development CA")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _mesh_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "profilemesh")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # One certificate per process, shown when it serves and when it calls another service.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _general_name(host: str) -> x509.GeneralName:
    # Clients dialling an address check it against the IP entries, names against DNS entries.
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _unique(hosts: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for host in hosts:
        name = host.strip()
        if name:
            seen.setdefault(name, None)
    return list(seen)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, mode: int) -> None:
    # Created with its final mode: a key is never readable by others, not even for a moment.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), mode)  # the umask may have narrowed the mode
        file.write(data)


def add_certs_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``certs`` command to ``subparsers`` (from ``add_subparsers``); returns it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "certs", help="create certificates for mutual TLS between the services"
    )
    actions = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="write a development CA and a certificate for the whole mesh",
        description="Write a development CA (ca.pem, ca-key.pem) and one certificate for "
        "every service, as server and client (mesh.pem, mesh-key.pem), into --out.",
    )
    create.add_argument("--out", type=Path, required=True, help="folder to write the files to")
    create.add_argument(
        "--hosts",
        default="",
        metavar="H1,H2,...",
        help="more names or IP addresses the services are reached at (comma-separated)",
    )
    create.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )
    return parser


def run_certs(args: argparse.Namespace) -> int:
    """Run ``certs create``; the exit status (1 when files exist, 2 for bad arguments)."""
    if args.days < 1:
        print("profilemesh certs create: --days must be at least 1", file=sys.stderr)
        return 2
    hosts = [host for host in args.hosts.split(",") if host.strip()]
    try:
        files = create_certificates(args.out, hosts, days=args.days)
    except FileExistsError as error:
        print(f"profilemesh certs create: {error}", file=sys.stderr)
        return 1
    print(f"wrote {files.ca_file} and {files.cert_file}, with their keys")
    print(f"keep {files.ca_key_file.name} private: it signs certificates the mesh trusts")
    print("set these variables for every service and client:")
    for name, value in files.environment().items():
        print(f"export {name}={shlex.quote(value)}")
    return 0
