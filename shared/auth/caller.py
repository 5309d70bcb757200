"""The caller of the call being served, for servicers that need to know who asks.

The access guard sets it before a servicer runs; it is a context variable, so concurrent calls
each see their own caller.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

ANONYMOUS_NAME = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a call: the id and name of the token it presented, and the token's scopes."""

    token_id: str
    name: str
    scopes: frozenset[str]


ANONYMOUS = Caller(token_id="", name=ANONYMOUS_NAME, scopes=frozenset())
"""The caller of a service whose auth is off, or of a call refused for lack of a valid token."""

_current: ContextVar[Caller] = ContextVar("profilemesh_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    """The caller of the call being served (``ANONYMOUS`` outside a call or with auth off)."""
    return _current.get()


def set_current_caller(caller: Caller) -> Token[Caller]:
    """Make ``caller`` the current caller; returns what :func:`reset_current_caller` needs."""
    return _current.set(caller)


def reset_current_caller(token: Token[Caller]) -> None:
    """Undo :func:`set_current_caller`."""
    _current.reset(token)
