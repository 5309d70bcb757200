"""The ``email`` activator: one email per delivery, over SMTP.

The recipient is the delivery field named by ``to_field``; the subject and plain-text body come
from the template configured for the delivery's transition (``entered``, ``exited``, ``sync``),
written with :class:`string.Template` placeholders: ``$first_name`` or ``${first_name}`` is the
delivery's ``first_name`` field (an absent field stops that email: a customer never sees a
literal ``$first_name``), and ``$profile_id``, ``$segment_id``, ``$transition`` and
``$occurred_at`` are there too unless a field has that name. A transition without a template
sends nothing: a destination configured for ``entered`` only welcomes and stays silent on exits.

Each batch is sent over one SMTP session, in a worker thread (:mod:`smtplib` blocks): connect,
STARTTLS if configured, log in if configured (the password is read from the environment
variable ``password_env`` names, so the stored configuration never holds it), then one message
per delivery.

SMTP has no deduplication, so idempotency has two halves. The activator keeps the keys it has
sent: in memory, and with ``state_dir`` also in a file there (``sent-keys.txt``, appended and
synced after each accepted message) so that a restart does not send them again; a delivery whose
key is known is reported delivered without a message. A crash between the server accepting a
message and the key reaching the file sends it once more, so every message also carries the key
in an ``X-Profilemesh-Idempotency-Key`` header and a ``Message-ID`` derived from it: exactly once
needs the receiving side (an ESP, a mail rule) to drop a second message with the same key. Give
each email destination its own ``state_dir``.

Outcomes: a missing or malformed recipient, an absent template field or an SMTP 5xx answer to the
message is permanent; a 4xx answer, a dropped connection or a timeout is retried. A session that
cannot start (unreachable server, STARTTLS or login refused, the password variable unset) retries
the whole batch, and so does 530 (authentication or STARTTLS required): they say nothing about
the messages, and an operator can fix them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import smtplib
import ssl
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from pathlib import Path
from string import Template
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from profilemesh.shared.extension_points import (
    Activator,
    Delivery,
    DeliveryOutcome,
    JSONValue,
    Transition,
)
from profilemesh.shared.hookspecs import hookimpl

logger = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "X-Profilemesh-Idempotency-Key"
"""Carries the delivery's idempotency key: receivers drop a second message with the same one."""

_SESSION_REFUSED = 530

STATE_FILE = "sent-keys.txt"
"""The file in ``state_dir`` listing the idempotency keys already sent, one per line."""


class EmailTemplate(BaseModel):
    """The subject and plain-text body of the email for one transition."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    subject: str = Field(min_length=1)
    """``string.Template`` text: ``Welcome, $first_name``."""
    body: str
    """``string.Template`` text; ``$$`` is a literal dollar sign."""

    @field_validator("subject", "body")
    @classmethod
    def _valid_template(cls, text: str) -> str:
        if not Template(text).is_valid():
            raise ValueError(
                "not a valid template: write $name or ${name} for a field, $$ for a dollar sign"
            )
        return text


class EmailConfig(BaseModel):
    """The SMTP server, the sender, where the recipient is, and what to write."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    host: str = Field(min_length=1)
    """The SMTP server (``smtp.example.com``)."""
    port: int = Field(default=587, ge=1, le=65535)
    """Its port: 587 for submission with STARTTLS, 25 for a relay."""
    from_address: str = Field(min_length=3)
    """The sender, optionally with a name: ``Shop <news@shop.example>``."""
    to_field: str = Field(default="email", min_length=1)
    """The delivery field holding the recipient's address."""
    templates: dict[Transition, EmailTemplate] = Field(min_length=1)
    """The email for each transition (``entered``, ``exited``, ``sync``); others send nothing."""
    starttls: bool = True
    """Upgrade the session to TLS with STARTTLS before logging in and sending."""
    ca_file: Path | None = None
    """A PEM file of certificate authorities to trust for STARTTLS instead of the system's."""
    username: str | None = Field(default=None, min_length=1)
    """The SMTP login; with it, ``password_env`` is required."""
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The name of an environment variable of the activation process holding the password."""
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    """How long connecting and each SMTP command may take before the batch is retried."""
    state_dir: Path | None = None
    """A folder for the record of keys sent, so a restart does not send them again."""

    @field_validator("from_address")
    @classmethod
    def _an_address(cls, value: str) -> str:
        if "@" not in parseaddr(value)[1]:
            raise ValueError("must be an email address, optionally with a name")
        return value

    @model_validator(mode="after")
    def _login_complete(self) -> Self:
        if (self.username is None) != (self.password_env is None):
            raise ValueError("give both username and password_env, or neither")
        return self


class _SessionFailed(Exception):
    """The SMTP session could not be started; nothing was sent."""


class EmailActivator(Activator):
    """Sends one templated email per delivery over SMTP, each idempotency key once."""

    name = "email"
    description = "Sends one templated email per delivery over SMTP (STARTTLS, login optional)."
    config_model = EmailConfig
    config: EmailConfig

    def __init__(self, config: Mapping[str, object] | BaseModel) -> None:
        """Validate the configuration; the state file is read on the first delivery."""
        super().__init__(config)
        self._sent: set[str] | None = None
        # One batch at a time: two sessions must not both send a key neither has recorded.
        self._lock = asyncio.Lock()

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        """Send an email for each delivery whose key was not sent before, in one session."""
        if not deliveries:
            return []
        async with self._lock:
            return await asyncio.to_thread(self._send_batch, deliveries)

    def _send_batch(self, deliveries: Sequence[Delivery]) -> list[DeliveryOutcome]:
        try:
            sent = self._sent_keys()
        except OSError as error:
            failed = DeliveryOutcome.retryable(f"cannot read the record of keys sent: {error}")
            return [failed] * len(deliveries)
        outcomes: dict[str, DeliveryOutcome] = {}
        messages: dict[str, EmailMessage] = {}  # A key twice in one batch is one email.
        for delivery in deliveries:
            key = delivery.idempotency_key
            if key in sent:
                outcomes[key] = DeliveryOutcome.delivered()
            elif key not in outcomes and key not in messages:
                prepared = self._message(delivery)
                if isinstance(prepared, DeliveryOutcome):
                    outcomes[key] = prepared
                else:
                    messages[key] = prepared
        if messages:
            outcomes.update(self._send(messages))
        return [outcomes[d.idempotency_key] for d in deliveries]

    def _message(self, delivery: Delivery) -> EmailMessage | DeliveryOutcome:
        """The email for ``delivery``, or the outcome that says why there is none."""
        template = self.config.templates.get(delivery.transition)
        if template is None:
            return DeliveryOutcome.delivered()  # This destination sends nothing for it.
        recipient = recipient_of(delivery.fields.get(self.config.to_field))
        if recipient is None:
            return DeliveryOutcome.permanent(
                f"field {self.config.to_field!r} holds no email address: "
                f"{delivery.fields.get(self.config.to_field)!r}"
            )
        try:
            values = template_values(delivery)
            subject = Template(template.subject).substitute(values)
            body = Template(template.body).substitute(values)
        except KeyError as error:
            return DeliveryOutcome.permanent(
                f"the {delivery.transition} template uses ${error.args[0]}, which the delivery "
                "does not have"
            )
        except (TypeError, ValueError) as error:
            return DeliveryOutcome.permanent(f"fields are not JSON: {error}")
        message = EmailMessage()
        try:
            message["From"] = self.config.from_address
            message["To"] = recipient
            message["Subject"] = subject
            message["Date"] = formatdate(usegmt=True)
            message["Message-ID"] = message_id(delivery.idempotency_key, self.config.from_address)
            message[IDEMPOTENCY_HEADER] = delivery.idempotency_key
            message.set_content(body)
        except (ValueError, TypeError) as error:  # a line break in a header value
            return DeliveryOutcome.permanent(f"cannot build the email: {error}")
        return message

    def _send(self, messages: dict[str, EmailMessage]) -> dict[str, DeliveryOutcome]:
        """Send ``messages`` (by idempotency key) in one session; an outcome for each key."""
        server = f"{self.config.host}:{self.config.port}"
        try:
            smtp = self._session()
        except _SessionFailed as error:
            failed = DeliveryOutcome.retryable(
                f"cannot start an SMTP session with {server}: {error}"
            )
            return dict.fromkeys(messages, failed)
        outcomes: dict[str, DeliveryOutcome] = {}
        queue = list(messages.items())
        try:
            for position, (key, message) in enumerate(queue):
                try:
                    smtp.send_message(message)
                except smtplib.SMTPRecipientsRefused as error:
                    code, reply = next(iter(error.recipients.values()))
                    outcomes[key] = outcome_of_reply(code, reply, "refused the recipient")
                    continue
                except smtplib.SMTPResponseException as error:
                    outcomes[key] = outcome_of_reply(
                        error.smtp_code, error.smtp_error, "refused the message"
                    )
                    continue
                except smtplib.SMTPNotSupportedError as error:  # e.g. a non-ASCII address
                    outcomes[key] = DeliveryOutcome.permanent(f"{server} cannot take it: {error}")
                    continue
                except OSError as error:  # dropped, timed out: this and the rest go again
                    lost = DeliveryOutcome.retryable(
                        f"SMTP session with {server} failed: {type(error).__name__}: {error}"
                    )
                    outcomes.update(dict.fromkeys((k for k, _ in queue[position:]), lost))
                    break
                self._record(key)
                outcomes[key] = DeliveryOutcome.delivered()
        finally:
            try:
                smtp.quit()
            except OSError:
                smtp.close()
        return outcomes

    def _session(self) -> smtplib.SMTP:
        """A connected SMTP session, upgraded to TLS and logged in as configured."""
        password = None
        if self.config.password_env is not None:
            password = os.environ.get(self.config.password_env)
            if not password:
                raise _SessionFailed(
                    f"environment variable {self.config.password_env} holding the SMTP "
                    "password is not set in the activation process"
                )
        try:
            smtp = smtplib.SMTP(
                self.config.host, self.config.port, timeout=self.config.timeout_seconds
            )
        except OSError as error:
            raise _SessionFailed(f"{type(error).__name__}: {error}") from error
        try:
            if self.config.starttls:
                cafile = str(self.config.ca_file) if self.config.ca_file else None
                smtp.starttls(context=ssl.create_default_context(cafile=cafile))
            if self.config.username is not None and password is not None:
                smtp.login(self.config.username, password)
        except OSError as error:  # smtplib's and ssl's errors are OSErrors too
            smtp.close()
            raise _SessionFailed(f"{type(error).__name__}: {error}") from error
        return smtp

    def _sent_keys(self) -> set[str]:
        if self._sent is None:
            self._sent = set()
            path = self._state_path()
            if path is not None and path.exists():
                with path.open(encoding="utf-8") as file:
                    # A torn last line from a crash is a key never reported delivered: skip it.
                    self._sent.update(line[:-1] for line in file if line.endswith("\n"))
        return self._sent

    def _record(self, key: str) -> None:
        """Remember that ``key`` was accepted by the server; in the state file if there is one."""
        self._sent_keys().add(key)
        path = self._state_path()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as file:
                file.write(key + "\n")
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            # The message went out: reporting it undelivered would send it again for sure,
            # whereas an unrecorded key is sent again only after a restart.
            logger.warning("email sent but its key not recorded in %s: %s", path, error)

    def _state_path(self) -> Path | None:
        return None if self.config.state_dir is None else self.config.state_dir / STATE_FILE


def recipient_of(value: JSONValue) -> str | None:
    """The address in a recipient field, or ``None`` when it holds no single plain address."""
    if not isinstance(value, str):
        return None
    address = value.strip()
    local, at, domain = address.rpartition("@")
    if not (local and at and "." in domain) or any(c.isspace() or c in "<>,;" for c in address):
        return None
    return address


def template_values(delivery: Delivery) -> dict[str, str]:
    """What a template's placeholders can name: the delivery's fields and its identifiers."""
    values = {
        "profile_id": delivery.profile_id,
        "segment_id": delivery.segment_id,
        "transition": delivery.transition,
        "occurred_at": delivery.occurred_at.isoformat(),
    }
    values.update({name: _text(value) for name, value in delivery.fields.items()})
    return values


def message_id(idempotency_key: str, from_address: str) -> str:
    """A ``Message-ID`` that is the same for every attempt at one delivery."""
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    domain = parseaddr(from_address)[1].rpartition("@")[2] or "profilemesh.invalid"
    return f"<{digest}.profilemesh@{domain}>"


def outcome_of_reply(code: int, reply: bytes | str, what: str) -> DeliveryOutcome:
    """A transient (4xx) SMTP answer is retried; a permanent (5xx) one is not.

    Except 530 (authentication or STARTTLS required), which is about the session this
    destination's configuration opens, not the message: retried, like a session that fails.
    """
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    error = f"SMTP server {what}: {code} {text}"
    if 500 <= code < 600 and code != _SESSION_REFUSED:
        return DeliveryOutcome.permanent(error)
    return DeliveryOutcome.retryable(error)


def _text(value: JSONValue) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=_plain)


def _plain(value: object) -> object:
    # JSONValue allows any Mapping or Sequence; json only knows dict, list and tuple.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


@hookimpl
def register_activators(register: Callable[[type[Activator]], None]) -> None:
    """Register the ``email`` activator."""
    register(EmailActivator)
