"""Real delivery receivers on localhost for end-to-end tests: a webhook endpoint that checks
signatures and applies each idempotency key once, and an SMTP server that keeps what it gets.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from profilemesh.plugins.webhook_activator import verify_signature
from tests.conftest import free_port

SECRET = "a-webhook-secret-of-some-length"


class WebhookReceiver:
    """Accepts signed POSTs; ``failing`` decides, per request, to answer with an error first.

    ``applied`` holds each payload once per idempotency key (what the receiver acted on);
    ``requests`` counts every request, repeats included.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.applied: dict[str, dict[str, Any]] = {}
        self.requests = 0
        self.bad_signatures = 0
        self.failing: Callable[[], int | None] = lambda: None
        self.stall_seconds = 0.0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.stall_seconds:  # slower than the sender's timeout
                    time.sleep(receiver.stall_seconds)
                status = receiver._handle(self.headers, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                return None  # a sender that gave up on a stalled request

        self._server = Server(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handle(self, headers: Any, body: bytes) -> int:
        with self._lock:
            self.requests += 1
            failure = self.failing()
            if failure is not None:
                return failure
            if not verify_signature(
                body,
                headers.get("X-Profilemesh-Signature", ""),
                headers.get("X-Profilemesh-Timestamp", ""),
                SECRET,
            ):
                self.bad_signatures += 1
                return 401
            key = headers.get("Idempotency-Key", "")
            self.applied.setdefault(key, json.loads(body))
            return 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.applied.values())


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


class SmtpReceiver:
    """An SMTP server on a free localhost port."""

    def __init__(self) -> None:
        self.port = free_port()
        self._mailbox = _Mailbox()
        self._controller = Controller(self._mailbox, hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpReceiver:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    @property
    def messages(self) -> list[Any]:
        return list(self._mailbox.messages)

    def keys(self) -> set[str]:
        return {m["X-Profilemesh-Idempotency-Key"] for m in self.messages}


async def eventually(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Wait (without blocking the event loop the services run on) until ``condition``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.05)
