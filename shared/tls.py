"""Mutual TLS credentials for the mesh, built from the ``tls`` settings.

Every service is a server to some and a client of others, so one certificate signed by the mesh
CA serves both roles. Servers demand a client certificate from that CA, which refuses anything
else at the handshake, before a call reaches a servicer; clients check the server's
certificate against the same CA and against the host they dialled.
"""

from __future__ import annotations

import grpc

from profilemesh.shared.settings import TlsSettings


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """What a server binds its port with: its own certificate, and the CA that every client's
    certificate must be signed by."""
    ca, cert, key = _files(tls)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """What a channel connects with: the CA that servers' certificates must be signed by, and
    the certificate this process shows as a client."""
    ca, cert, key = _files(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def target_name_options(tls: TlsSettings) -> list[tuple[str, object]]:
    """Channel options TLS needs beyond the credentials: the name servers' certificates are
    checked against, when it is not the dialled host."""
    if tls.server_name_override:
        return [("grpc.ssl_target_name_override", tls.server_name_override)]
    return []


def _files(tls: TlsSettings) -> tuple[bytes, bytes, bytes]:
    if tls.ca_file is None or tls.cert_file is None or tls.key_file is None:
        raise ValueError("tls needs ca_file, cert_file and key_file")
    return tls.ca_file.read_bytes(), tls.cert_file.read_bytes(), tls.key_file.read_bytes()
