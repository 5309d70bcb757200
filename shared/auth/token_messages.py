"""Token records to and from their ``profilemesh.common.v1.ApiToken`` messages."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from profilemesh.common.v1 import auth_service_pb2
from profilemesh.shared.auth.token_store import TokenRecord


def token_to_proto(record: TokenRecord) -> auth_service_pb2.ApiToken:
    """``record`` as the message the AuthService returns."""
    message = auth_service_pb2.ApiToken(
        token_id=record.token_id, name=record.name, scopes=list(record.scopes)
    )
    message.created_at.CopyFrom(_timestamp(record.created_at))
    if record.expires_at is not None:
        message.expires_at.CopyFrom(_timestamp(record.expires_at))
    if record.revoked_at is not None:
        message.revoked_at.CopyFrom(_timestamp(record.revoked_at))
    return message


def token_from_proto(message: auth_service_pb2.ApiToken) -> TokenRecord:
    """The record an ``ApiToken`` message describes."""
    return TokenRecord(
        token_id=message.token_id,
        name=message.name,
        scopes=tuple(message.scopes),
        created_at=_seconds(message.created_at),
        expires_at=_seconds(message.expires_at) if message.HasField("expires_at") else None,
        revoked_at=_seconds(message.revoked_at) if message.HasField("revoked_at") else None,
    )


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(int(seconds * 1e9))
    return timestamp


def _seconds(timestamp: timestamp_pb2.Timestamp) -> float:
    return float(timestamp.ToNanoseconds()) / 1e9
