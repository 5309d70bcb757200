"""The built-in activators against real destinations on localhost: an HTTP receiver, an SMTP
server, audience files on disk; each also through the conformance kit and its entry point."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from profilemesh.plugins import audience_export_activator, email_activator, webhook_activator
from profilemesh.plugins.audience_export_activator import (
    AudienceExportActivator,
    normalise_email,
    normalise_phone,
)
from profilemesh.plugins.email_activator import EmailActivator, message_id
from profilemesh.plugins.webhook_activator import (
    WebhookActivator,
    request_body,
    retry_after,
    verify_signature,
)
from profilemesh.shared.errors import InvalidArgument
from profilemesh.shared.extension_points import (
    Delivery,
    DeliveryOutcome,
    DeliveryStatus,
    JSONValue,
    Transition,
)
from profilemesh.shared.plugin_manager import PluginDescription, create_plugin_manager
from profilemesh.testing import check_activator_async, check_plugin, sample_deliveries
from tests.conftest import free_port

SECRET = "whsec-test-0123456789abcdef"
DELIVERED, RETRYABLE, PERMANENT = (
    DeliveryStatus.DELIVERED,
    DeliveryStatus.RETRYABLE,
    DeliveryStatus.PERMANENT,
)


def delivery(key: str, transition: Transition = "entered", **fields: JSONValue) -> Delivery:
    """One delivery of ``fields`` to segment ``vip``."""
    return Delivery(
        idempotency_key=key,
        profile_id=f"profile-{key}",
        segment_id="vip",
        transition=transition,
        fields=fields,
        occurred_at=datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
    )


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- entry points --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "entry_point", "name"),
    [
        (webhook_activator, "webhook_activator", "webhook"),
        (email_activator, "email_activator", "email"),
        (audience_export_activator, "audience_export_activator", "audience_export"),
    ],
)
def test_each_activator_is_a_plugin_loaded_through_its_entry_point(
    module: ModuleType, entry_point: str, name: str
) -> None:
    rows = check_plugin(module)
    assert [(row.kind, row.names, row.failure) for row in rows] == [("activator", (name,), None)]
    plugins = create_plugin_manager()

    assert plugins.failures == []
    assert plugins.activator(name).__module__ == module.__name__
    assert PluginDescription(entry_point, "activator", (name,), None) in plugins.describe()


# --- webhook: a real HTTP receiver -----------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on localhost that checks signatures and acts on each key once.

    ``answers[path]`` queues scripted answers (status, headers) given before the normal 200;
    ``/slow`` answers only after a second.
    """

    secret: str
    port: int = 0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    """Signed requests per idempotency key, whatever they were answered."""
    acted_on: list[str] = field(default_factory=list)
    """The keys acted on, in order: each once, however often it arrived."""
    answers: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/hooks") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        with self.lock:
            self.requests.append((path, headers, body))
            if not verify_signature(
                body,
                headers.get("x-profilemesh-signature", ""),
                headers.get("x-profilemesh-timestamp", ""),
                self.secret,
            ):
                return 401, {}
            key = headers["idempotency-key"]
            self.attempts[key] += 1
            if self.answers.get(path):
                return self.answers[path].pop(0)
            if key not in self.acted_on:  # A repeat is acknowledged, not acted on again.
                self.acted_on.append(key)
        if path == "/slow":
            time.sleep(1.0)
        return 200, {}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(SECRET)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, extra = state.answer(self.path, headers, body)
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # A client that timed out and hung up is what some tests do on purpose.

    server = Server(("127.0.0.1", free_port()), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


async def test_webhook_passes_the_conformance_kit_and_the_receiver_acts_on_each_key_once(
    receiver: Receiver,
) -> None:
    await check_activator_async(
        WebhookActivator,
        {"url": receiver.url(), "secret": SECRET},
        bad_config={"url": "not a url", "secret": SECRET, "timeout_seconds": 0},
    )

    assert len(receiver.acted_on) == 4
    # One instance never re-POSTs what it saw accepted; the restarted one sends all four
    # again, and the receiver deduplicates them by Idempotency-Key.
    assert sorted(receiver.attempts.values()) == [2, 2, 2, 2]


async def test_webhook_request_is_json_with_key_timestamp_and_a_verifiable_signature(
    receiver: Receiver,
) -> None:
    sent = delivery("k-1", first_name="Ann", orders=3)
    before = int(time.time())
    async with WebhookActivator({"url": receiver.url(), "secret": SECRET}) as activator:
        assert await activator.deliver([sent]) == [DeliveryOutcome.delivered()]

    [(path, headers, body)] = receiver.requests
    assert path == "/hooks"
    assert headers["content-type"] == "application/json"
    assert headers["idempotency-key"] == "k-1"
    assert before <= int(headers["x-profilemesh-timestamp"]) <= time.time()
    assert json.loads(body) == {
        "idempotency_key": "k-1",
        "profile_id": "profile-k-1",
        "segment_id": "vip",
        "transition": "entered",
        "fields": {"first_name": "Ann", "orders": 3},
        "occurred_at": "2025-03-01T12:00:00+00:00",
    }
    assert body == request_body(sent)
    timestamp, signature = headers["x-profilemesh-timestamp"], headers["x-profilemesh-signature"]
    # The documented scheme, computed here independently of the module:
    signed = timestamp.encode() + b"." + body
    assert signature == "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert verify_signature(body, signature, timestamp, SECRET)
    assert not verify_signature(body + b" ", signature, timestamp, SECRET)
    assert not verify_signature(body, signature, timestamp, "another-secret-entirely")
    assert not verify_signature(body, signature, str(int(timestamp) + 1), SECRET)
    assert not verify_signature(body, signature, timestamp, SECRET, now=int(timestamp) + 301)
    assert verify_signature(body, signature, timestamp, SECRET, now=int(timestamp) + 299)
    assert not verify_signature(body, signature, "soon", SECRET)


async def test_webhook_retries_500_and_503_then_delivers_once(receiver: Receiver) -> None:
    receiver.answers["/flaky"] = [(500, {}), (503, {})]
    sent = [delivery("k-1")]
    async with WebhookActivator({"url": receiver.url("/flaky"), "secret": SECRET}) as activator:
        first = await activator.deliver(sent)
        second = await activator.deliver(sent)
        third = await activator.deliver(sent)

    assert [first[0].status, second[0].status, third[0].status] == [RETRYABLE, RETRYABLE, DELIVERED]
    assert "HTTP 500" in (first[0].error or "")
    assert receiver.attempts == Counter({"k-1": 3})
    assert receiver.acted_on == ["k-1"]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, PERMANENT),
        (404, PERMANENT),
        (422, PERMANENT),
        (302, PERMANENT),
        (408, RETRYABLE),
        (429, RETRYABLE),
        (500, RETRYABLE),
        (502, RETRYABLE),
        (503, RETRYABLE),
    ],
)
async def test_webhook_outcome_follows_the_status(
    receiver: Receiver, status: int, expected: DeliveryStatus
) -> None:
    receiver.answers["/hooks"] = [(status, {"Location": "https://example.com/"})]
    async with WebhookActivator({"url": receiver.url(), "secret": SECRET}) as activator:
        [outcome] = await activator.deliver([delivery("k-1")])

    assert outcome.status is expected
    assert f"HTTP {status}" in (outcome.error or "")


async def test_webhook_honours_retry_after_in_seconds(receiver: Receiver) -> None:
    receiver.answers["/hooks"] = [(429, {"Retry-After": "7"})]
    async with WebhookActivator({"url": receiver.url(), "secret": SECRET}) as activator:
        [outcome] = await activator.deliver([delivery("k-1")])

    assert outcome.status is RETRYABLE
    assert outcome.retry_after_seconds == 7.0


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC)

    assert retry_after("120") == 120.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 30.0
    assert retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now=now) == 0.0
    assert retry_after(None) is None
    assert retry_after("soon") is None


async def test_webhook_timeout_is_retryable_and_does_not_wait_for_the_receiver(
    receiver: Receiver,
) -> None:
    config = {"url": receiver.url("/slow"), "secret": SECRET, "timeout_seconds": 0.3}
    started = time.monotonic()
    async with WebhookActivator(config) as activator:
        [outcome] = await activator.deliver([delivery("k-1")])

    assert outcome.status is RETRYABLE
    assert "0.3 s" in (outcome.error or "")
    assert time.monotonic() - started < 0.9


async def test_webhook_refused_connection_is_retryable() -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks"  # Nobody listens there.
    async with WebhookActivator({"url": url, "secret": SECRET}) as activator:
        [outcome] = await activator.deliver([delivery("k-1")])

    assert outcome.status is RETRYABLE
    assert "ConnectError" in (outcome.error or "")


async def test_webhook_reads_its_secret_from_the_named_environment_variable(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {"url": receiver.url(), "secret_env": "PM_TEST_WEBHOOK_SECRET"}
    monkeypatch.delenv("PM_TEST_WEBHOOK_SECRET", raising=False)
    async with WebhookActivator(config) as activator:
        [unset] = await activator.deliver([delivery("k-1")])
        monkeypatch.setenv("PM_TEST_WEBHOOK_SECRET", SECRET)
        [set_] = await activator.deliver([delivery("k-1")])

    assert unset.status is RETRYABLE
    assert "PM_TEST_WEBHOOK_SECRET" in (unset.error or "")
    assert set_.status is DELIVERED
    assert len(receiver.requests) == 1  # Nothing was sent unsigned.


async def test_webhook_fields_that_are_not_json_are_permanent(receiver: Receiver) -> None:
    async with WebhookActivator({"url": receiver.url(), "secret": SECRET}) as activator:
        outcomes = await activator.deliver([delivery("k-1", score=float("nan")), delivery("k-2")])

    assert [o.status for o in outcomes] == [PERMANENT, DELIVERED]
    assert len(receiver.requests) == 1


@pytest.mark.parametrize(
    "config",
    [
        {"url": "https://example.com/hooks"},
        {"url": "https://example.com/hooks", "secret": SECRET, "secret_env": "X"},
        {"url": "https://example.com/hooks", "secret": "short"},
        {"url": "https://example.com/hooks", "secret_env": "not a name"},
    ],
)
def test_webhook_needs_exactly_one_usable_secret(config: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as raised:
        WebhookActivator(config)

    assert all(v.field.startswith("config") for v in raised.value.violations)
    assert "short" not in str(raised.value)  # A secret never appears in an error.


# --- email: a real SMTP server ---------------------------------------------------------------


@dataclass
class Mailbox:
    """What the SMTP server received; ``refuse[address]`` is its reply to that recipient."""

    received: list[tuple[str, list[str], EmailMessage]] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # SMTP carries CRLF line ends; compare text with plain newlines.
        content = envelope.content.replace(b"\r\n", b"\n")
        message = message_from_bytes(content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def keys(self) -> list[str]:
        return [m[email_activator.IDEMPOTENCY_HEADER] for _, _, m in self.received]


@dataclass
class SmtpServer:
    mailbox: Mailbox
    port: int


def start_smtp(**options: Any) -> tuple[Controller, SmtpServer]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    return controller, SmtpServer(mailbox, port)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    controller, server = start_smtp()
    yield server
    controller.stop()


TEMPLATES = {
    "entered": {
        "subject": "Welcome, $first_name",
        "body": "Hi $first_name,\nyou are in $segment_id.",
    },
    "exited": {"subject": "See you, ${first_name}", "body": "Bye $first_name: $$5 off next time."},
}


def email_config(port: int, **overrides: object) -> dict[str, object]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "from_address": "Shop <news@shop.example>",
        "to_field": "email",
        "templates": TEMPLATES,
        "starttls": False,
        "timeout_seconds": 5,
        **overrides,
    }


def sample_with_names() -> list[Delivery]:
    # The kit's samples cover every transition; the templates use $first_name.
    return [
        Delivery(
            d.idempotency_key,
            d.profile_id,
            d.segment_id,
            d.transition,
            {**d.fields, "first_name": f"P{i}"},
            d.occurred_at,
        )
        for i, d in enumerate(sample_deliveries())
    ]


async def test_email_passes_the_conformance_kit_sending_each_key_once(
    smtp: SmtpServer, tmp_path: Path
) -> None:
    await check_activator_async(
        EmailActivator,
        email_config(smtp.port, state_dir=str(tmp_path / "state")),
        sample_with_names,
        bad_config=email_config(smtp.port, templates={}, from_address="nobody"),
    )

    # Samples 0 and 3 entered, 1 exited, 2 is a sync, which has no template: three emails,
    # each once, even from the restarted instance (the keys are in the state file).
    keys = smtp.mailbox.keys()
    assert len(keys) == 3
    assert len(set(keys)) == 3
    assert (tmp_path / "state" / "sent-keys.txt").read_text().count("\n") == 3


async def test_email_without_state_dir_sends_again_after_a_restart_with_the_same_key(
    smtp: SmtpServer,
) -> None:
    await check_activator_async(EmailActivator, email_config(smtp.port), sample_with_names)

    # In memory only: the restarted instance sends its three again; the receiver deduplicates
    # on the header, which is the same each time.
    assert sorted(Counter(smtp.mailbox.keys()).values()) == [2, 2, 2]


async def test_email_goes_to_the_recipient_field_with_the_transition_template(
    smtp: SmtpServer,
) -> None:
    entered = delivery("k-in", "entered", email=" ann@example.com ", first_name="Ann")
    exited = delivery("k-out", "exited", email="bob@example.com", first_name="Bob")
    synced = delivery("k-sync", "sync", email="cy@example.com", first_name="Cy")
    async with EmailActivator(email_config(smtp.port)) as activator:
        outcomes = await activator.deliver([entered, exited, synced])

    assert [o.status for o in outcomes] == [DELIVERED, DELIVERED, DELIVERED]
    [(sender, to_ann, ann), (_, to_bob, bob)] = smtp.mailbox.received  # sync: no template
    assert sender == "news@shop.example"
    assert to_ann == ["ann@example.com"]
    assert ann["To"] == "ann@example.com"
    assert ann["From"] == "Shop <news@shop.example>"
    assert ann["Subject"] == "Welcome, Ann"
    assert ann.get_content() == "Hi Ann,\nyou are in vip.\n"
    assert ann["X-Profilemesh-Idempotency-Key"] == "k-in"
    assert ann["Message-ID"] == message_id("k-in", "news@shop.example")
    assert ann["Message-ID"].endswith("@shop.example>")
    assert to_bob == ["bob@example.com"]
    assert bob["Subject"] == "See you, Bob"
    assert bob.get_content() == "Bye Bob: $5 off next time.\n"


async def test_email_without_a_recipient_or_a_template_field_is_permanent(
    smtp: SmtpServer,
) -> None:
    batch = [
        delivery("no-field", first_name="Ann"),
        delivery("null", email=None, first_name="Ann"),
        delivery("not-an-address", email="ann at example", first_name="Ann"),
        delivery("no-name", email="ann@example.com"),
        delivery("injected", email="ann@example.com", first_name="Ann\nBcc: all@example.com"),
    ]
    async with EmailActivator(email_config(smtp.port)) as activator:
        outcomes = await activator.deliver(batch)

    assert [o.status for o in outcomes] == [PERMANENT] * 5
    assert "'email'" in (outcomes[0].error or "")
    assert "$first_name" in (outcomes[3].error or "")
    assert smtp.mailbox.received == []


async def test_email_smtp_4xx_is_retryable_5xx_permanent_and_the_session_goes_on(
    smtp: SmtpServer,
) -> None:
    smtp.mailbox.refuse = {
        "busy@example.com": "451 4.3.0 Try again later",
        "gone@example.com": "550 5.1.1 No such user",
    }
    batch = [
        delivery("busy", email="busy@example.com", first_name="A"),
        delivery("gone", email="gone@example.com", first_name="B"),
        delivery("fine", email="fine@example.com", first_name="C"),
    ]
    async with EmailActivator(email_config(smtp.port)) as activator:
        outcomes = await activator.deliver(batch)

    assert [o.status for o in outcomes] == [RETRYABLE, PERMANENT, DELIVERED]
    assert "451" in (outcomes[0].error or "")
    assert "550" in (outcomes[1].error or "")
    assert smtp.mailbox.keys() == ["fine"]


async def test_email_unreachable_server_is_retryable() -> None:
    async with EmailActivator(email_config(free_port())) as activator:
        outcomes = await activator.deliver([delivery("k", email="a@example.com", first_name="A")])

    assert [o.status for o in outcomes] == [RETRYABLE]
    assert "cannot start an SMTP session" in (outcomes[0].error or "")


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_email_logs_in_with_the_password_from_the_named_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"s3cret-pass", handled=False)

    # Plain text AUTH is fine on loopback; PLAIN only, so each attempt is one login.
    controller, server = start_smtp(
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=False,
        auth_exclude_mechanism=["LOGIN"],
    )
    config = email_config(server.port, username="mailer", password_env="PM_TEST_SMTP_PASSWORD")
    sent = [delivery("k", email="a@example.com", first_name="A")]
    try:
        monkeypatch.delenv("PM_TEST_SMTP_PASSWORD", raising=False)
        async with EmailActivator(config) as activator:
            [unset] = await activator.deliver(sent)
            monkeypatch.setenv("PM_TEST_SMTP_PASSWORD", "wrong")
            [wrong] = await activator.deliver(sent)
            monkeypatch.setenv("PM_TEST_SMTP_PASSWORD", "s3cret-pass")
            [right] = await activator.deliver(sent)
    finally:
        controller.stop()

    assert unset.status is RETRYABLE
    assert "PM_TEST_SMTP_PASSWORD" in (unset.error or "")
    assert wrong.status is RETRYABLE
    assert "535" in (wrong.error or "")
    assert right.status is DELIVERED
    assert logins == [(b"mailer", b"wrong"), (b"mailer", b"s3cret-pass")]
    assert server.mailbox.keys() == ["k"]


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_email_starttls_verifies_the_server_against_the_configured_ca(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    controller, server = start_smtp(tls_context=context, require_starttls=True)
    sent = [delivery("k", email="a@example.com", first_name="A")]
    try:
        async with EmailActivator(
            email_config(server.port, starttls=True, ca_file=str(cert))
        ) as trusting:
            [trusted] = await trusting.deliver(sent)
        async with EmailActivator(email_config(server.port, starttls=True)) as system_cas:
            [untrusted] = await system_cas.deliver(
                [delivery("k2", email="a@example.com", first_name="A")]
            )
        async with EmailActivator(email_config(server.port)) as plain:
            [refused] = await plain.deliver([delivery("k3", email="b@example.com", first_name="B")])
    finally:
        controller.stop()

    assert trusted.status is DELIVERED
    assert untrusted.status is RETRYABLE
    assert "CERTIFICATE_VERIFY_FAILED" in (untrusted.error or "")
    # 530 "Must issue a STARTTLS command first" is about the session, not the message.
    assert refused.status is RETRYABLE
    assert "530" in (refused.error or "")
    assert server.mailbox.keys() == ["k"]


# --- audience export: files on disk ----------------------------------------------------------

ANN = "71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476"  # ann@example.com
ANN_NAME = "49915e0d7d4b402e3017d010bc1c0e83cac6c797d6c16e66340fe3268693a6a1"  # ann
PHONE_E164 = "fab7be8a931d1088a82f6acf9e468aaf6a3accc07d5112ee5d6fca93281e1583"  # +31612345678
PHONE_DIGITS = "e03d152bbe638d9fe7a04f9b88a67674bf15b73c0981755c16eb78d177721e03"  # 31612345678
GMAIL = (
    "6991e5bc292506cf9419b31ab5fafb69220b47703e37668f6562b7addb4df84b"  # jdoe+ads@googlemail.com
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def audience_config(path: Path, **overrides: object) -> dict[str, object]:
    return {
        "path": str(path),
        "hash_fields": {"email": "email", "phone": "phone", "first_name": "other"},
        "fields": ["country"],
        "phone_region": "NL",
        **overrides,
    }


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
async def test_audience_export_passes_the_conformance_kit_one_row_per_key(
    tmp_path: Path, file_format: str
) -> None:
    path = tmp_path / ("audience.csv" if file_format == "csv" else "audience")
    config = {
        "path": str(path),
        "format": file_format,
        "hash_fields": {"email": "email"},
        "fields": ["vip", "tags"],
    }

    await check_activator_async(
        AudienceExportActivator,
        config,
        bad_config={**config, "hash_fields": {}, "format": "xlsx"},
    )

    rows = read_csv(path) if file_format == "csv" else pq.read_table(path).to_pylist()
    assert [row["email"] for row in rows] == [sha256(f"person{i}@example.com") for i in range(4)]
    assert [row["action"] for row in rows] == ["add", "remove", "add", "add"]
    assert [row["vip"] for row in rows] == ["true", "false", "true", "false"]
    assert rows[0]["tags"] == '["conformance", "n0"]'


async def test_audience_export_hashes_normalised_emails_phones_and_names(tmp_path: Path) -> None:
    path = tmp_path / "out" / "audience.csv"
    batch = [
        delivery(
            "a",
            email=" Ann@Example.COM ",
            phone="+31 6 1234 5678",
            first_name=" Ann ",
            country="NL",
        ),
        delivery("b", "exited", email="ann@example.com", phone="06-12345678"),
        delivery("c", "sync", phone="0031 6 12345678"),
    ]
    async with AudienceExportActivator(audience_config(path)) as activator:
        outcomes = await activator.deliver(batch)

    assert [o.status for o in outcomes] == [DELIVERED] * 3
    assert read_csv(path) == [
        {
            "action": "add",
            "segment_id": "vip",
            "occurred_at": "2025-03-01T12:00:00+00:00",
            "email": ANN,
            "phone": PHONE_E164,
            "first_name": ANN_NAME,
            "country": "NL",
        },
        {
            "action": "remove",
            "segment_id": "vip",
            "occurred_at": "2025-03-01T12:00:00+00:00",
            "email": ANN,
            "phone": PHONE_E164,
            "first_name": "",
            "country": "",
        },
        {
            "action": "add",
            "segment_id": "vip",
            "occurred_at": "2025-03-01T12:00:00+00:00",
            "email": "",
            "phone": PHONE_E164,
            "first_name": "",
            "country": "",
        },
    ]
    assert sha256(" Ann@Example.COM ".strip().lower()) == ANN
    assert sha256("+31612345678") == PHONE_E164


async def test_audience_export_phones_as_digits_and_gmail_dots_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "meta.csv"
    config = audience_config(path, phone_format="digits", gmail_remove_dots=True)
    batch = [delivery("a", email=" J.Doe+ads@GoogleMail.com ", phone="+31 6 12345678")]
    async with AudienceExportActivator(config) as activator:
        assert await activator.deliver(batch) == [DeliveryOutcome.delivered()]

    [row] = read_csv(path)
    assert row["email"] == GMAIL
    assert row["phone"] == PHONE_DIGITS
    assert normalise_email("J.Doe@Example.com", gmail_remove_dots=True) == "j.doe@example.com"
    assert normalise_email("J.Doe@gmail.com") == "j.doe@gmail.com"
    assert normalise_phone("(650) 253-0000", "US") == "+16502530000"


async def test_audience_export_leaves_bad_values_empty_and_refuses_rows_with_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audience.csv"
    batch = [
        delivery("bad-phone", email="ann@example.com", phone="12"),
        delivery("nothing", phone="not a phone", email="nobody", first_name="  "),
        delivery("absent", country="NL"),
    ]
    async with AudienceExportActivator(audience_config(path)) as activator:
        outcomes = await activator.deliver(batch)

    assert [o.status for o in outcomes] == [DELIVERED, PERMANENT, PERMANENT]
    assert "no identifier to match on" in (outcomes[1].error or "")
    assert "phone (not a" in (outcomes[1].error or "")
    assert "email (absent)" in (outcomes[2].error or "")
    [row] = read_csv(path)
    assert (row["email"], row["phone"]) == (ANN, "")


async def test_audience_export_parquet_adds_a_file_per_batch_readable_as_one_table(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "audience"
    config = audience_config(folder, format="parquet")
    async with AudienceExportActivator(config) as activator:
        await activator.deliver([delivery("a", email="ann@example.com")])
        await activator.deliver([delivery("b", "exited", phone="+31612345678"), delivery("a")])

    table = pq.read_table(folder)
    assert table.column_names == [
        "action",
        "segment_id",
        "occurred_at",
        "email",
        "phone",
        "first_name",
        "country",
    ]
    rows = sorted(table.to_pylist(), key=lambda row: row["action"])
    assert [(r["action"], r["email"], r["phone"]) for r in rows] == [
        ("add", ANN, None),
        ("remove", None, PHONE_E164),
    ]
    names = sorted(p.name for p in folder.iterdir())
    assert names[0] == "_keys.txt"
    assert [n.startswith("part-") and n.endswith(".parquet") for n in names[1:]] == [True, True]


async def test_audience_export_refuses_to_append_to_a_csv_with_other_columns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audience.csv"
    path.write_text("email,phone\nx,y\n")
    async with AudienceExportActivator(audience_config(path)) as activator:
        [outcome] = await activator.deliver([delivery("a", email="ann@example.com")])

    assert outcome.status is RETRYABLE
    assert "move it away" in (outcome.error or "")
    assert path.read_text() == "email,phone\nx,y\n"


async def test_audience_export_cuts_a_row_torn_by_a_crash_before_appending(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audience.csv"
    async with AudienceExportActivator(audience_config(path)) as activator:
        await activator.deliver([delivery("a", email="ann@example.com")])
    with path.open("a") as file:
        file.write("add,vip,2025-03-01T12:00:00+00:00,71d4")  # The crash: no newline, no key.

    async with AudienceExportActivator(audience_config(path)) as restarted:
        outcomes = await restarted.deliver(
            [
                delivery("a", email="ann@example.com"),
                delivery("b", "exited", email="ann@example.com"),
            ]
        )

    assert [o.status for o in outcomes] == [DELIVERED, DELIVERED]
    assert [(row["action"], row["email"]) for row in read_csv(path)] == [
        ("add", ANN),
        ("remove", ANN),
    ]
