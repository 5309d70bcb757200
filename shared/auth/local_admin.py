"""A local mesh's admin token, so that ``profilemesh up`` and ``profilemesh demo`` run with auth
on and need no set-up.

When auth is on and no token is configured, the launcher takes the token in
``<data_dir>/admin.token`` (kept from an earlier run, so the CLI keeps working across
restarts) or makes one and writes it there, readable by its owner only. Every service gets it
as its own token and identity as the bootstrap token; the CLI finds it in the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from profilemesh.shared.auth.outbound import admin_token_path
from profilemesh.shared.auth.tokens import generate_token, token_id_of
from profilemesh.shared.settings import Settings


def prepare_local_admin(settings: Settings) -> tuple[Settings, Path | None]:
    """``settings`` with the local admin token as ``auth.token`` and ``auth.bootstrap_token``,
    and the file that holds it; unchanged (and None) when auth is off or a token is set."""
    auth = settings.auth
    if not auth.enabled or auth.token:
        return settings, None
    path = admin_token_path(settings)
    token = auth.bootstrap_token or _read(path) or generate_token()
    write_private(path, token)
    updated = auth.model_copy(update={"token": token, "bootstrap_token": token})
    return settings.model_copy(update={"auth": updated}), path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (also when the file existed with another)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, f"{text}\n".encode())
    finally:
        os.close(descriptor)


def _read(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    return token if token_id_of(token) is not None else None
