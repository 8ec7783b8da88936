"""One webhook POST: the CloudEvents HTTP binding, a signature, a verdict.

:class:`WebhookSender` turns a chora :class:`~contracts.envelope.CloudEvent`
into an HTTP request in CloudEvents *structured* mode with the official SDK
(``cloudevents.core.bindings.http.to_structured``: the whole event, attributes
and data, as JSON in the body, ``Content-Type: application/cloudevents+json``,
so the signature covers the attributes too), adds

- ``webhook-id`` / ``webhook-timestamp`` / ``webhook-signature``, the Standard
  Webhooks headers (see :mod:`.signing`),
- ``Idempotency-Key: <event id>:<subscription>``, equal to ``webhook-id`` (the
  same on every attempt),

POSTs it with its own ``httpx.AsyncClient`` (one per subscription, the
subscription's timeout, no redirects) and classifies the answer:

- ``delivered``: 2xx;
- ``transient``: connection error, timeout, 5xx, 408, 429 (with the
  ``Retry-After`` of a 429 or 503, in seconds or as an HTTP date);
- ``permanent``: anything else (other 4xx, 3xx: redirects are not followed).

The HMAC secrets only ever go into :func:`.signing.signature`; it is not an
attribute of anything printable and is never part of a message.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Sequence
from typing import Callable, Literal, Protocol

try:  # the maintained continuation of httpx (what anthropic installs), else httpx itself
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

import msgspec
from cloudevents.core.bindings.http import to_structured
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkCloudEvent

from contracts.envelope import CloudEvent
from services.notifier.config import Backoff, Subscription
from services.notifier.signing import signature_headers

IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = "chora-notifier/0.1"
TRANSIENT_STATUS = frozenset({408, 429})
RETRY_AFTER_STATUS = frozenset({429, 503})
MAX_SNIPPET = 200

_format = JSONFormat()


class UndeliverableEvent(ValueError):
    """The event cannot be expressed as an SDK CloudEvent (e.g. an unparsable time)."""


# --------------------------------------------------------------------------- policy


def backoff_delay(attempt: int, cfg: Backoff, rng: random.Random | None = None) -> float:
    """The delay before retrying after failed attempt ``attempt`` (1-based), with jitter.

    Always within ``[base * (1 - jitter), min(max_s, base * (1 + jitter))]`` where
    ``base = min(max_s, initial_s * multiplier ** (attempt - 1))``.
    """
    n = max(1, attempt)
    try:
        base = cfg.initial_s * cfg.multiplier ** (n - 1)
    except OverflowError:
        base = cfg.max_s
    base = min(cfg.max_s, base)
    if cfg.jitter:
        base *= (rng or random).uniform(1.0 - cfg.jitter, 1.0 + cfg.jitter)
    return max(0.0, min(cfg.max_s, base))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent
    or unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


# --------------------------------------------------------------------------- the request


def to_sdk_event(event: CloudEvent) -> SdkCloudEvent:
    """Our envelope as the CloudEvents SDK's v1 event; the data as plain JSON values (so that
    structured mode writes it as ``data``, not ``data_base64``)."""
    attrs: dict = {"id": event.id, "source": event.source, "type": event.type, "specversion": event.specversion}
    if event.time:
        try:
            t = datetime.fromisoformat(event.time)
        except ValueError:
            raise UndeliverableEvent(f"attribute time {event.time!r} is not RFC 3339") from None
        attrs["time"] = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    for name in ("datacontenttype", "subject", "dataschema", "traceid", "traceparent"):
        value = getattr(event, name)
        if value:
            attrs[name] = value
    attrs.update(event.extensions)
    data = None if event.data is None else msgspec.to_builtins(event.data)
    try:
        return SdkCloudEvent(attrs, data)
    except BaseCloudEventException as e:
        raise UndeliverableEvent(f"not a valid CloudEvent for HTTP: {e}") from None


def build_request(
    event: CloudEvent, subscription: str, secret: bytes | Sequence[bytes], *, now: float | None = None
) -> tuple[dict[str, str], bytes]:
    """Headers and body of the POST for ``event`` (structured mode, signed with every secret)."""
    msg = to_structured(to_sdk_event(event), _format)
    headers = dict(msg.headers)
    delivery_id = f"{event.id}:{subscription}"
    headers.update(signature_headers(secret, delivery_id, msg.body, now))
    headers[IDEMPOTENCY_HEADER] = delivery_id
    return headers, msg.body


# --------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class DeliveryResult:
    outcome: Literal["delivered", "transient", "permanent"]
    status_code: int | None
    duration_ms: float
    code: str = ""  # why it failed: CONNECT_ERROR, TIMEOUT, TRANSPORT_ERROR, HTTP_<status>
    message: str = ""
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "delivered"

    @property
    def endpoint_failed(self) -> bool:
        """Whether this counts against the endpoint's availability (circuit breaker)."""
        return self.outcome == "transient"


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)[:MAX_SNIPPET]


async def _head_of_body(resp: "httpx.Response") -> bytes:
    """Up to :data:`MAX_SNIPPET` bytes of the body, however long it is."""
    snippet = b""
    async for chunk in resp.aiter_bytes():
        snippet += chunk
        if len(snippet) >= MAX_SNIPPET:
            break
    return snippet


async def _finish_accepted(resp: "httpx.Response", deadline: float) -> None:
    """Read a 2xx's body (its first :data:`MAX_SNIPPET` bytes, within the delivery's deadline)
    before closing it: a response read to its end leaves its connection to the next delivery
    (keep-alive), where one closed unread closes the connection, and every delivery would open
    a new one. A longer, slow or broken body changes nothing: the endpoint accepted the event."""
    try:
        async with asyncio.timeout_at(deadline):
            await _head_of_body(resp)
    except Exception:
        pass
    finally:
        await resp.aclose()


def split_credentials(url: str) -> tuple[str, "httpx.BasicAuth | None"]:
    """The URL without its userinfo, and that userinfo as basic auth (or None)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    return clean, httpx.BasicAuth(user, password)


class Sender(Protocol):
    """What a delivery needs of a sender (:class:`WebhookSender`, or one bound to a callback URL)."""

    async def send(self, event: CloudEvent) -> DeliveryResult: ...

    async def close(self) -> None: ...


class WebhookSender:
    """Delivers events to one subscription's URL."""

    def __init__(
        self,
        subscription: Subscription,
        secret: bytes | Sequence[bytes],
        *,
        client: "httpx.AsyncClient | None" = None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.subscription = subscription
        self._secret = secret
        self.wall_clock = wall_clock
        # user:password in the URL travel as basic auth, never in the URL: HTTP clients log URLs.
        self.url, auth = split_credentials(subscription.url)
        self.client = client or httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(subscription.timeout_s),
            limits=httpx.Limits(
                max_connections=subscription.max_in_flight,
                max_keepalive_connections=min(subscription.max_in_flight, 16),
            ),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )

    def __repr__(self) -> str:  # never the secret
        return f"WebhookSender({self.subscription.name!r})"

    def request(self, event: CloudEvent) -> tuple[dict[str, str], bytes]:
        return build_request(event, self.subscription.name, self._secret, now=self.wall_clock())

    async def send(self, event: CloudEvent, url: str | None = None) -> DeliveryResult:
        """POST ``event`` (to ``url``, a per-request callback, else the subscription's URL); never
        raises for a network or HTTP problem (only UndeliverableEvent)."""
        headers, body = self.request(event)
        sub = self.subscription
        t0 = time.perf_counter()

        def ms() -> float:
            return round((time.perf_counter() - t0) * 1000.0, 3)

        deadline = asyncio.get_running_loop().time() + sub.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                req = self.client.build_request("POST", url or self.url, headers=headers, content=body)
                resp = await self.client.send(req, stream=True)
                if not 200 <= resp.status_code < 300:
                    try:
                        snippet = await _head_of_body(resp)
                    finally:
                        await resp.aclose()
        except (TimeoutError, httpx.TimeoutException):
            return DeliveryResult("transient", None, ms(), "TIMEOUT", f"no answer within {sub.timeout_s}s")
        except httpx.ConnectError as e:
            return DeliveryResult(
                "transient", None, ms(), "CONNECT_ERROR", f"cannot connect: {_printable(str(e)) or type(e).__name__}"
            )
        except httpx.HTTPError as e:  # read/write/protocol errors: the endpoint may be fine next time
            return DeliveryResult(
                "transient", None, ms(), "TRANSPORT_ERROR", f"{type(e).__name__}: {_printable(str(e))}"
            )
        except OSError as e:
            return DeliveryResult(
                "transient", None, ms(), "TRANSPORT_ERROR", f"{type(e).__name__}: {_printable(str(e))}"
            )
        except Exception as e:  # anything else the client raises: retried, then dead-lettered, never a loop
            return DeliveryResult("transient", None, ms(), "CLIENT_ERROR", f"{type(e).__name__}: {_printable(str(e))}")

        status = resp.status_code
        if 200 <= status < 300:
            await _finish_accepted(resp, deadline)
            return DeliveryResult("delivered", status, ms())
        text = _printable(snippet.decode("utf-8", "replace")).strip()
        message = f"HTTP {status}" + (f": {text}" if text else "")
        code = f"HTTP_{status}"
        if status >= 500 or status in TRANSIENT_STATUS:
            retry_after = parse_retry_after(resp.headers.get("Retry-After")) if status in RETRY_AFTER_STATUS else None
            return DeliveryResult("transient", status, ms(), code, message, retry_after)
        if 300 <= status < 400:
            message += " (redirects are not followed: point the subscription at the final URL)"
        return DeliveryResult("permanent", status, ms(), code, message)

    async def close(self) -> None:
        await self.client.aclose()
