"""A real HTTP server on 127.0.0.1 that speaks enough of the Anthropic Messages API
(``POST /v1/messages``) for the code_generation tests: no test needs the live API.

What it answers is chosen by the request's prompt: the first ``scenario=NAME`` in
the user message (default ``ok``):

- ``ok``: 200, a reply with a ```python block (and one in another language);
- ``prose``: 200, a reply without any code block;
- ``401``, ``403``, ``400``: the API's error bodies;
- ``429``: rate limited, with ``retry-after`` (7 s unless told);
- ``529``: overloaded; ``500``: an API error;
- ``slow``: the reply after ``slow_s`` seconds (longer than the config's timeout);
- ``malformed``: 200 with a body that is not JSON;
- ``flaky``: 529 with ``retry-after`` on the first ``flaky_failures`` calls (counted per server), then ``ok``.

Every request is recorded (headers, JSON body, monotonic arrival time) in :attr:`FakeMessagesAPI.requests`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY_TEXT = (
    "Here is the function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n"
    "And a shell check:\n\n```sh\npython -c 'print(1)'\n```\n"
)
_SCENARIO = re.compile(r"scenario=([A-Za-z0-9_-]+)")


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class FakeMessagesAPI:
    def __init__(self, slow_s: float = 3.0, flaky_failures: int = 2, retry_after: str = "7"):
        self.slow_s = slow_s
        self.flaky_failures = flaky_failures
        self.retry_after = retry_after
        self.requests: list[dict[str, Any]] = []
        self.flaky_calls = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "at": time.monotonic()}
                    )
                status, headers, payload = fake.answer(self.path, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FakeMessagesAPI":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def scenarios(self) -> list[str]:
        with self._lock:
            return [self._scenario(r["body"]) for r in self.requests]

    @staticmethod
    def _scenario(body: dict[str, Any]) -> str:
        text = json.dumps(body.get("messages", []))
        m = _SCENARIO.search(text)
        return m.group(1) if m else "ok"

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        if path.split("?")[0] != "/v1/messages":
            return 404, {}, _error("not_found_error", f"no route {path}")
        scenario = self._scenario(body)
        if scenario == "flaky":
            with self._lock:
                self.flaky_calls += 1
                failing = self.flaky_calls <= self.flaky_failures
            if failing:
                return 529, {"retry-after": self.retry_after}, _error("overloaded_error", "Overloaded")
            scenario = "ok"
        if scenario == "slow":
            self._stop.wait(self.slow_s)
            scenario = "ok"
        if scenario == "ok":
            return 200, {"request-id": "req_fake"}, self.message(body, REPLY_TEXT)
        if scenario == "prose":
            return 200, {}, self.message(body, "I would rather not write code today.")
        if scenario == "malformed":
            return 200, {}, b'{"id": "msg_1", "content": [ this is not json'
        if scenario == "401":
            return 401, {}, _error("authentication_error", "invalid x-api-key")
        if scenario == "403":
            return 403, {}, _error("permission_error", "not allowed")
        if scenario == "400":
            return 400, {}, _error("invalid_request_error", "max_tokens: too large")
        if scenario == "429":
            return 429, {"retry-after": self.retry_after}, _error("rate_limit_error", "rate limited")
        if scenario == "529":
            return 529, {}, _error("overloaded_error", "Overloaded")
        if scenario == "500":
            return 500, {}, _error("api_error", "Internal server error")
        return 400, {}, _error("invalid_request_error", f"unknown scenario {scenario}")

    @staticmethod
    def message(body: dict[str, Any], text: str) -> dict[str, Any]:
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "unknown"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 42, "output_tokens": 17},
        }


def wait_until(predicate, timeout: float, what: str) -> None:
    """For threads: poll ``predicate`` until true or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
