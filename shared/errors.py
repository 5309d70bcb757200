"""Domain errors: values with a status code and the offending fields.

Domain code raises these; it imports no gRPC. One server interceptor
(:mod:`profilemesh.shared.error_interceptor`) turns them into ``google.rpc.Status`` with
``BadRequest`` field violations, ``ErrorInfo`` and ``RetryInfo`` details.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

# ErrorInfo.domain of every error profilemesh raises.
ERROR_DOMAIN = "profilemesh.dev"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path (``events[3].track.event``) and what is wrong."""

    field: str
    description: str


class DomainError(Exception):
    """An error a caller can act on.

    ``code`` names a ``grpc.StatusCode`` member; ``reason`` is a stable UPPER_SNAKE identifier
    that clients may branch on (sent as ``ErrorInfo.reason``); ``metadata`` adds context.
    """

    code: ClassVar[str] = "UNKNOWN"
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        violations: Iterable[FieldViolation | tuple[str, str]] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.violations = [
            v if isinstance(v, FieldViolation) else FieldViolation(*v) for v in violations
        ]
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    """The request is malformed; ``violations`` name each offending field."""

    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def for_field(cls, field: str, description: str) -> InvalidArgument:
        """The common case: one field is wrong."""
        return cls(f"{field}: {description}", violations=[FieldViolation(field, description)])


class NotFound(DomainError):
    """The addressed resource does not exist."""

    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    """A resource with that name or id exists already."""

    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    """The request is valid but the system is not in a state to carry it out."""

    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(DomainError):
    """Overload: the caller should retry after ``retry_after_seconds``."""

    code = "RESOURCE_EXHAUSTED"
    default_reason = "OVERLOADED"

    def __init__(self, message: str, *, retry_after_seconds: float = 1.0, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after_seconds = retry_after_seconds


class Unavailable(DomainError):
    """A dependency (another service, a store) cannot be reached right now; retrying may help."""

    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class Unauthenticated(DomainError):
    """The call carries no valid credentials (missing, malformed, unknown, revoked, expired)."""

    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """The caller is known but may not do this; the message names the scope it lacks."""

    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"
