"""A real webhook receiver for tests: a stdlib ``ThreadingHTTPServer`` on 127.0.0.1:0 in a
thread, speaking HTTP/1.1 with keep-alive (so the notifier reuses its connections and the
receiver is never the bottleneck). It records every POST and answers what ``respond``
says; it checks nothing itself: the tests verify what it recorded, as a receiver would
(:meth:`Received.verify`: the Standard Webhooks signature by the ``standardwebhooks`` package,
then the CloudEvent in structured mode from the verified body).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import standardwebhooks

IDEMPOTENCY_KEY = "Idempotency-Key"
WEBHOOK_ID = "webhook-id"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A notifier opens up to max_in_flight connections at once (after a restart, or when a
    # circuit closes): the default listen backlog of 5 would refuse most of them.
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client killed mid-request: not news
            super().handle_error(request, client_address)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    peer: tuple = ()  # the client's (host, port): one per TCP connection

    def header(self, name: str) -> str | None:
        """A header by name, whatever its case."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    @property
    def event(self) -> dict[str, Any]:
        """The CloudEvent (structured mode: attributes and ``data``), unverified."""
        return json.loads(self.body)

    def verify(self, secret: str | bytes) -> dict[str, Any]:
        """The CloudEvent, once ``standardwebhooks`` has verified the signature (and the
        timestamp's age) with ``secret`` (``whsec_<base64>``, or raw bytes); raises
        ``standardwebhooks.WebhookVerificationError`` otherwise. The webhook-id must be the
        Idempotency-Key a receiver deduplicates on."""
        event = standardwebhooks.Webhook(secret).verify(self.body, self.headers)
        if self.header(WEBHOOK_ID) != self.header(IDEMPOTENCY_KEY):
            raise standardwebhooks.WebhookVerificationError("webhook-id is not the Idempotency-Key")
        return event


class Webhook:
    """``respond(n)`` -> (status, headers) for the n-th request (0-based); ``hold``: answer
    only once :attr:`released` is set (a slow endpoint)."""

    def __init__(self, respond=None, *, hold: bool = False, path: str = "/hook"):
        self.respond = respond or (lambda n: (200, {}))
        self.hold = hold
        self.released = threading.Event()
        self.received: list[Received] = []
        self.answered = 0
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection serves many deliveries
            # the status line and headers go in one write and the body in another: with Nagle's
            # algorithm on, the body would wait for the client's delayed ACK (~40 ms a request)
            disable_nagle_algorithm = True

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if len(body) < length:  # the sender died mid-request (kill -9): no request, nothing to answer
                    self.close_connection = True
                    return
                with hook._lock:
                    n = len(hook.received)
                    hook.received.append(Received(dict(self.headers.items()), body, time.time(), self.client_address))
                if hook.hold:
                    hook.released.wait(120)
                status, headers = hook.respond(n)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the client gave up (timeout)
                    return
                with hook._lock:
                    hook.answered += 1

            def log_message(self, *args):
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def event_ids(self) -> list[str]:
        """The CloudEvent ids of every POST, in arrival order."""
        with self._lock:
            return [r.event["id"] for r in self.received]

    def keys(self) -> Counter:
        """How many POSTs each ``Idempotency-Key`` got (a retry or redelivery repeats its key)."""
        with self._lock:
            return Counter(r.headers.get(IDEMPOTENCY_KEY) for r in self.received)

    def __enter__(self) -> "Webhook":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def dead_url(path: str = "/hook") -> str:
    """A URL on a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
