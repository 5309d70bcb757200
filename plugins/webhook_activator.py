"""The ``webhook`` activator: POSTs each delivery as signed JSON to a URL.

One request per delivery, up to ``max_concurrent_requests`` at a time, over one HTTP connection
pool per destination. The request::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <the delivery's idempotency key>
    X-Profilemesh-Timestamp: <Unix time in whole seconds when the request was signed>
    X-Profilemesh-Signature: sha256=<hex HMAC-SHA256 of the signed content, with the secret>

    {"fields":{...},"idempotency_key":"...","occurred_at":"2025-01-01T00:00:00+00:00",
     "profile_id":"...","segment_id":"...","transition":"entered"}

The signed content is the timestamp header's value exactly as sent, one ``.`` and the raw
request body, byte for byte (as Stripe signs ``t=...,v1=...``)::

    signed = timestamp.encode("ascii") + b"." + body
    signature = "sha256=" + hmac.new(secret.encode("utf-8"), signed, "sha256").hexdigest()

A receiver recomputes the HMAC over the body it read (before parsing it), compares it in
constant time, and refuses a timestamp more than a few minutes from its own clock, so that a
captured request cannot be replayed later; :func:`verify_signature` does all three. Each attempt
is signed afresh, so a retry carries a new timestamp and the same body and idempotency key: the
receiver acts on each ``Idempotency-Key`` once and answers 2xx to a repeat.

Outcomes: 2xx is delivered; 408, 429, 5xx, timeouts and connection failures are retried (after
the ``Retry-After`` the receiver asked for, in seconds or as an HTTP date); any other status,
redirects included, is permanent. The secret is given inline (``secret``) or, better, by the
name of an environment variable of the activation process that holds it (``secret_env``), read
on the first delivery so that the stored configuration never contains it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, model_validator

from profilemesh.shared.extension_points import Activator, Delivery, DeliveryOutcome
from profilemesh.shared.hookspecs import hookimpl

SIGNATURE_HEADER = "X-Profilemesh-Signature"
"""Carries ``sha256=<hex>``: the HMAC-SHA256 of ``<timestamp>.<body>`` with the secret."""

TIMESTAMP_HEADER = "X-Profilemesh-Timestamp"
"""Unix time in whole seconds when the request was signed; part of the signed content."""

IDEMPOTENCY_HEADER = "Idempotency-Key"
"""The delivery's idempotency key, the same on every retry: receivers deduplicate on it."""

_REMEMBERED_KEYS = 10_000
_RETRYABLE_STATUSES = frozenset({408, 429})


class WebhookConfig(BaseModel):
    """Where to POST, how to sign, and how long to wait."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    url: HttpUrl
    """The receiver's URL (``https://hooks.example.com/profilemesh``)."""
    secret: SecretStr | None = Field(default=None, min_length=16)
    """The signing secret itself; prefer ``secret_env``, which keeps it out of the config."""
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The name of an environment variable of the activation process holding the secret."""
    timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """How long one request may take in all (connecting, sending, the answer) before retrying."""
    max_concurrent_requests: int = Field(default=8, ge=1, le=256)
    """Requests in flight at once for this destination."""

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("give exactly one of secret and secret_env")
        return self


class WebhookActivator(Activator):
    """POSTs each delivery as signed JSON; the receiver deduplicates by ``Idempotency-Key``."""

    name = "webhook"
    description = "POSTs each delivery as HMAC-signed JSON to a URL, with an Idempotency-Key."
    config_model = WebhookConfig
    config: WebhookConfig

    def __init__(self, config: Mapping[str, object] | BaseModel) -> None:
        """Validate the configuration; the HTTP client is created on the first delivery."""
        super().__init__(config)
        self._client: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(self.config.max_concurrent_requests)
        # Keys this instance saw accepted: a retried batch does not POST them again. After a
        # restart the receiver's own deduplication by Idempotency-Key takes over.
        self._delivered: OrderedDict[str, None] = OrderedDict()

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        """POST each delivery not yet accepted, concurrently; one outcome each, in order."""
        if not deliveries:
            return []
        secret = self._secret()
        if secret is None:
            missing = DeliveryOutcome.retryable(
                f"environment variable {self.config.secret_env} holding the webhook secret is "
                "not set in the activation process"
            )
            return [missing] * len(deliveries)
        # A key twice in one batch is one message: POST it once and report both.
        first_of_key = {d.idempotency_key: d for d in reversed(deliveries)}
        pending = [d for key, d in first_of_key.items() if key not in self._delivered]
        results = await asyncio.gather(*(self._post(d, secret) for d in pending))
        by_key = dict(zip((d.idempotency_key for d in pending), results, strict=True))
        return [by_key.get(d.idempotency_key, DeliveryOutcome.delivered()) for d in deliveries]

    async def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _secret(self) -> bytes | None:
        if self.config.secret is not None:
            return self.config.secret.get_secret_value().encode("utf-8")
        value = os.environ.get(self.config.secret_env or "")
        return value.encode("utf-8") if value else None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout_seconds),
                limits=httpx.Limits(max_connections=self.config.max_concurrent_requests),
                headers={"User-Agent": "profilemesh-webhook/1"},
                follow_redirects=False,
            )
        return self._client

    async def _post(self, delivery: Delivery, secret: bytes) -> DeliveryOutcome:
        try:
            body = request_body(delivery)
        except (TypeError, ValueError) as error:
            return DeliveryOutcome.permanent(f"fields are not JSON: {error}")
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: delivery.idempotency_key,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: _signature(body, timestamp, secret),
        }
        url = str(self.config.url)
        async with self._slots:
            try:
                # httpx's timeout bounds each phase; this bounds the request as a whole, so a
                # receiver dribbling its answer byte by byte cannot hold a slot forever.
                async with asyncio.timeout(self.config.timeout_seconds):
                    response = await self._http().post(url, content=body, headers=headers)
            except TimeoutError:
                return DeliveryOutcome.retryable(
                    f"no answer from {url} within {self.config.timeout_seconds:g} s"
                )
            except httpx.TimeoutException as error:
                return DeliveryOutcome.retryable(
                    f"timed out after {self.config.timeout_seconds:g} s "
                    f"({type(error).__name__}) posting to {url}"
                )
            except httpx.HTTPError as error:
                return DeliveryOutcome.retryable(
                    f"cannot reach {url}: {type(error).__name__}: {error}"
                )
        outcome = outcome_of(response)
        if outcome.error is None:
            self._remember(delivery.idempotency_key)
        return outcome

    def _remember(self, key: str) -> None:
        self._delivered[key] = None
        if len(self._delivered) > _REMEMBERED_KEYS:
            self._delivered.popitem(last=False)


def request_body(delivery: Delivery) -> bytes:
    """The JSON body POSTed for ``delivery``: compact, keys sorted, UTF-8.

    The same delivery always gives the same bytes, so every retry carries the same body.
    """
    record = {
        "idempotency_key": delivery.idempotency_key,
        "profile_id": delivery.profile_id,
        "segment_id": delivery.segment_id,
        "transition": delivery.transition,
        "fields": delivery.fields,
        "occurred_at": delivery.occurred_at.isoformat(),
    }
    text = json.dumps(
        record,
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=False,
        allow_nan=False,
        default=_plain,
    )
    return text.encode("utf-8")


def outcome_of(response: httpx.Response) -> DeliveryOutcome:
    """What the receiver's answer means for the delivery."""
    status = response.status_code
    if 200 <= status < 300:
        return DeliveryOutcome.delivered()
    detail = f"HTTP {status} from {response.request.url}"
    excerpt = response.text[:200].strip()
    if excerpt:
        detail += f": {excerpt}"
    if status in _RETRYABLE_STATUSES or status >= 500:
        return DeliveryOutcome.retryable(detail, retry_after(response.headers.get("Retry-After")))
    if 300 <= status < 400:
        location = response.headers.get("Location", "elsewhere")
        return DeliveryOutcome.permanent(
            f"{detail} (redirects to {location}; configure the final URL)"
        )
    return DeliveryOutcome.permanent(detail)


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date.

    ``None`` when the header is absent or unreadable; never negative.
    """
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def signature_header(body: bytes, timestamp: str, secret: str) -> str:
    """The ``X-Profilemesh-Signature`` value for ``body`` sent with ``timestamp``."""
    return _signature(body, timestamp, secret.encode("utf-8"))


def verify_signature(
    body: bytes,
    header: str,
    timestamp: str,
    secret: str,
    tolerance_seconds: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether a request really comes from profilemesh, for receivers.

    ``body`` is the raw request body as received, ``header`` the ``X-Profilemesh-Signature``
    value, ``timestamp`` the ``X-Profilemesh-Timestamp`` value and ``secret`` the shared
    secret. False when the signature does not match, or when the timestamp is not a whole
    number of seconds or is more than ``tolerance_seconds`` from ``now`` (the current time
    by default): a replay of an old request fails even with its valid signature.
    """
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    sent_at = int(timestamp)
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance_seconds:
        return False
    expected = signature_header(body, timestamp, secret)
    return hmac.compare_digest(header.strip().encode("ascii", "replace"), expected.encode("ascii"))


def _signature(body: bytes, timestamp: str, secret: bytes) -> str:
    signed = timestamp.encode("ascii") + b"." + body
    return "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()


def _plain(value: object) -> object:
    # JSONValue allows any Mapping or Sequence; json only knows dict, list and tuple.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


@hookimpl
def register_activators(register: Callable[[type[Activator]], None]) -> None:
    """Register the ``webhook`` activator."""
    register(WebhookActivator)
