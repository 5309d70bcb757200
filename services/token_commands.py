"""``profilemesh tokens``: create, revoke and list the mesh's API tokens.

::

    profilemesh tokens create --name crm-sync --scopes events:write,sources:admin --ttl-days 90
    profilemesh tokens list
    profilemesh tokens revoke 3f9a0c1d2b4e5f60
    profilemesh tokens create --name ops --scopes admin --offline

By default through identity's AuthService (with an ``admin`` token: ``auth.token`` or the local
mesh's ``admin.token``). ``--offline`` writes identity's token store directly, which is how the
first token is made before anything runs. A new token is printed once, on its own line; only
its digest is kept. Exit status: 0 on success, 1 when the service or the store refused, 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import duration_pb2

from profilemesh.common.v1 import auth_service_pb2, auth_service_pb2_grpc
from profilemesh.shared.auth.scopes import SCOPES
from profilemesh.shared.auth.token_messages import token_from_proto
from profilemesh.shared.auth.token_store import TokenRecord, token_store
from profilemesh.shared.channel import channel_to
from profilemesh.shared.errors import DomainError
from profilemesh.shared.settings import Settings

PROGRAM = "profilemesh tokens"
DAY = 86_400


def add_tokens_parser(commands: Any) -> None:
    tokens = commands.add_parser("tokens", help="create, revoke and list API tokens")
    actions = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    offline = argparse.ArgumentParser(add_help=False)
    offline.add_argument(
        "--offline",
        action="store_true",
        help="write identity's token store directly instead of calling identity",
    )
    create = actions.add_parser("create", parents=[offline], help="create a token, shown once")
    create.add_argument("--name", required=True, help="who or what holds the token")
    create.add_argument(
        "--scopes",
        required=True,
        help=f"comma-separated scopes: {', '.join(SCOPES)}",
    )
    create.add_argument("--ttl-days", type=float, help="days until it expires (default: never)")
    revoke = actions.add_parser("revoke", parents=[offline], help="revoke a token")
    revoke.add_argument("token_id")
    listing = actions.add_parser("list", parents=[offline], help="list tokens (never the tokens)")
    listing.add_argument("--all", action="store_true", help="include revoked and expired ones")


def run_tokens(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.offline:
            return _offline(args, settings)
        return asyncio.run(_online(args, settings))
    except grpc.aio.AioRpcError as error:
        return _fail(f"{error.code().name}: {error.details()}", 1)
    except DomainError as error:
        return _fail(error.message, 1)
    except ValueError as error:
        return _fail(str(error), 2)


def _scopes(text: str) -> list[str]:
    return [scope.strip() for scope in text.split(",") if scope.strip()]


def _ttl_seconds(args: argparse.Namespace) -> float | None:
    if args.ttl_days is None:
        return None
    if args.ttl_days <= 0:
        raise ValueError("--ttl-days must be positive")
    return float(args.ttl_days * DAY)


def _offline(args: argparse.Namespace, settings: Settings) -> int:
    with token_store(settings) as store:
        if args.action == "create":
            token, record = store.create(
                args.name, _scopes(args.scopes), ttl_seconds=_ttl_seconds(args)
            )
            _print_created(token, record)
        elif args.action == "revoke":
            print(describe(store.revoke(args.token_id)))
        else:
            _print_list(store.tokens(include_inactive=args.all))
    return 0


async def _online(args: argparse.Namespace, settings: Settings) -> int:
    async with channel_to("identity", settings) as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        if args.action == "create":
            request = auth_service_pb2.CreateTokenRequest(
                name=args.name, scopes=_scopes(args.scopes)
            )
            ttl = _ttl_seconds(args)
            if ttl is not None:
                request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl)))
            created = await stub.CreateToken(request)
            _print_created(created.token, token_from_proto(created.metadata))
        elif args.action == "revoke":
            revoked = await stub.RevokeToken(
                auth_service_pb2.RevokeTokenRequest(token_id=args.token_id)
            )
            print(describe(token_from_proto(revoked.metadata)))
        else:
            listed = await stub.ListTokens(
                auth_service_pb2.ListTokensRequest(include_inactive=args.all)
            )
            _print_list([token_from_proto(token) for token in listed.tokens])
    return 0


def _print_created(token: str, record: TokenRecord) -> None:
    # The token alone on stdout, so that `$(profilemesh tokens create ...)` captures it.
    print(token)
    print(
        f"{describe(record)}\nStore the token now: it is not shown again.",
        file=sys.stderr,
    )


def _print_list(records: Sequence[TokenRecord]) -> None:
    if not records:
        print("no tokens")
    for record in records:
        print(describe(record))


def describe(record: TokenRecord, now: float | None = None) -> str:
    """One line about a token: id, name, scopes, when it was made and its state."""
    now = time.time() if now is None else now
    if record.revoked_at is not None:
        state = f"revoked {_when(record.revoked_at)}"
    elif record.expires_at is not None and record.expires_at <= now:
        state = f"expired {_when(record.expires_at)}"
    elif record.expires_at is not None:
        state = f"expires {_when(record.expires_at)}"
    else:
        state = "active"
    return (
        f"{record.token_id}  {record.name:<20} {','.join(record.scopes):<32} "
        f"created {_when(record.created_at)}  {state}"
    )


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _fail(message: str, code: int) -> int:
    print(f"{PROGRAM}: {message}", file=sys.stderr)
    return code
