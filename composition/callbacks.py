"""Per-request callbacks: which URLs a request may ask to be called back at.

A request (generation, artifact, batch) may carry ``callback_url``: the notifier then
POSTs its outcome there, signed like any webhook. A callback goes only to an address
the operator allowed (``CHORA_CALLBACK_ALLOW``), never to one a caller chose freely:
that is the defence against server-side request forgery.

An allow-list entry is either

- a host name, ``hooks.example.com``: any http(s) URL on that host and its default port;
  ``hooks.example.com:8443`` names the port;
- or a URL prefix, ``https://n8n.internal/webhook/``: same scheme, host and port, and a
  path under that prefix (compared by whole path segments after normalising, so
  ``/webhook`` does not allow ``/webhook-evil`` and ``/webhook/../admin`` is refused).

The gateway checks a callback when the request comes in (a 422 with the reason), and
the notifier checks it again before it sends (a request may come from any NATS client).
"""

from __future__ import annotations

import posixpath
from urllib.parse import SplitResult, urlsplit

MAX_CALLBACK_URL_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CallbackRefused(ValueError):
    """The callback URL is malformed or not on the allow-list; the message says which."""


def _parse(url: str) -> tuple[SplitResult, str, int, str]:
    if len(url) > MAX_CALLBACK_URL_LENGTH:
        raise CallbackRefused(f"callback_url is longer than {MAX_CALLBACK_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise CallbackRefused("callback_url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(f"callback_url is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise CallbackRefused("callback_url must be an http or https URL")
    if not parts.hostname:
        raise CallbackRefused("callback_url has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("callback_url must not carry credentials")
    path = parts.path or "/"
    if "\\" in path or any(enc in path.lower() for enc in ("%2e", "%2f", "%5c")):
        raise CallbackRefused("callback_url path must not encode dots, slashes or backslashes")
    # "/a/../b" -> "/b": a prefix is compared against where the URL really points.
    normal = posixpath.normpath(path)
    if path.endswith("/") and not normal.endswith("/"):
        normal += "/"
    return parts, parts.hostname.lower().rstrip("."), port or _DEFAULT_PORTS[scheme], normal


def _allows(entry: str, scheme: str, host: str, port: int, path: str) -> bool:
    if "://" not in entry:
        name, _, port_text = entry.lower().rstrip(".").partition(":")
        want_port = int(port_text) if port_text.isdigit() else _DEFAULT_PORTS[scheme]
        return name == host and want_port == port
    try:
        allowed, a_host, a_port, a_path = _parse(entry)
    except CallbackRefused:
        return False
    if allowed.scheme.lower() != scheme or a_host != host or a_port != port:
        return False
    if not a_path.endswith("/"):
        return path == a_path or path.startswith(a_path + "/")
    return path.startswith(a_path)


def check_callback_url(url: str, allow: list[str]) -> str:
    """Return ``url`` when the allow-list admits it; raise :class:`CallbackRefused` otherwise."""
    parts, host, port, path = _parse(url)
    if not allow:
        raise CallbackRefused("callbacks are off: CHORA_CALLBACK_ALLOW lists no host or URL prefix")
    if not any(_allows(entry.strip(), parts.scheme.lower(), host, port, path) for entry in allow if entry.strip()):
        raise CallbackRefused(f"callback_url host {host!r} (port {port}) is not on the callback allow-list")
    return url
