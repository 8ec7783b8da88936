"""Connecting to NATS from settings: URL, credentials, TLS, reconnects."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from typing import Any, Awaitable, Callable

import nats
import nats.errors
from nats.aio.client import Client

from bus.settings import NatsSettings

log = logging.getLogger("chora.bus")


def _tls(s: NatsSettings) -> ssl.SSLContext | None:
    if not (s.tls_ca or s.tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=str(s.tls_ca) if s.tls_ca else None)
    if s.tls_cert:
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key) if s.tls_key else None)
    return ctx


class TLSConnectError(ConnectionError):
    """The TLS handshake of the first connection failed (e.g. an untrusted server certificate)."""


class NoServersReached(nats.errors.NoServersError):
    """nats-py's "no servers available", with the last error its error callback saw (an
    "Authorization Violation", a refused connection): the reason, not only the outcome."""

    def __init__(self, last_error: Exception):
        super().__init__()
        self.last_error = last_error

    def __str__(self) -> str:
        return f"nats: no servers available for connection; last error: {self.last_error}"


async def connect(
    s: NatsSettings,
    url: str | None = None,
    *,
    name: str = "chora",
    inbox_prefix: str = "_INBOX",
    disconnected: Callable[[], Awaitable[None]] | None = None,
    reconnected: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    """Connect with reconnects. ``inbox_prefix`` lets a least-privilege user subscribe only
    to its own replies (e.g. ``_INBOX.generator.>``). ``disconnected`` / ``reconnected``
    are awaited when the connection drops and when it is back (``disconnected`` also on close).

    A failed TLS handshake on the first connection raises :class:`TLSConnectError` at once:
    nats-py 2.x reports it to the error callback and then never returns from connect()
    (nats-io/nats.py#718), which would leave a service with a wrong CA hanging silently.
    """
    handshake_failed: asyncio.Future = asyncio.get_running_loop().create_future()
    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:
        if isinstance(e, ssl.SSLError) and not handshake_failed.done():
            handshake_failed.set_result(e)
        errors[:] = [e]
        log.warning("nats error: %s", e)

    async def on_disconnect() -> None:
        log.debug("nats disconnected")
        if disconnected is not None:
            await disconnected()

    async def on_reconnect() -> None:
        log.info("nats reconnected")
        if reconnected is not None:
            await reconnected()

    opts: dict[str, Any] = dict(
        servers=[u.strip() for u in (url or s.url or "nats://127.0.0.1:4222").split(",")],
        name=name,
        connect_timeout=s.connect_timeout,
        max_reconnect_attempts=s.max_reconnect_attempts,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        pending_size=64 * 1024 * 1024,
        inbox_prefix=inbox_prefix,
    )
    if s.creds:
        opts["user_credentials"] = str(s.creds)
    if s.user:
        opts["user"], opts["password"] = s.user, s.password.get_secret_value() if s.password else ""
    if s.token:
        opts["token"] = s.token.get_secret_value()
    if (tls := _tls(s)) is not None:
        opts["tls"] = tls
    connecting = asyncio.ensure_future(nats.connect(**opts))
    await asyncio.wait({connecting, handshake_failed}, return_when=asyncio.FIRST_COMPLETED)
    if connecting.done():
        if not handshake_failed.done():
            handshake_failed.cancel()  # later TLS errors (on a reconnect) are only logged
        try:
            return connecting.result()
        except nats.errors.NoServersError as e:
            if errors:
                raise NoServersReached(errors[0]) from e
            raise
    connecting.cancel()
    try:
        await connecting
    except BaseException:  # cancelled (or failed on its own meanwhile): the TLS error is the story
        pass
    servers = ", ".join(opts["servers"])
    raise TLSConnectError(
        f"TLS handshake with {servers} failed: {handshake_failed.result()}. "
        "Check NATS_TLS_CA / NATS_CA / --tls-ca (the CA that signed the server's certificate) and that the certificate "
        "names the host in NATS_URL."
    )


async def settle(nc: Client, timeout: float = 5.0) -> None:
    """Write everything buffered (acks, naks, UNSUBs), then wait for a round trip.

    nats-py 2.16's ``flush()`` writes its PING straight to the socket, ahead of the
    commands still buffered, and ``close()`` cancels the flusher without waiting: so
    neither proves that the acks written just before reached the server. Forcing the
    buffer out first (the client's own ``_flush_pending``) makes the PONG mean it.
    """
    try:
        flush_pending = getattr(nc, "_flush_pending", None)
        if flush_pending is not None:
            await asyncio.wait_for(flush_pending(force_flush=True), timeout)
        await nc.flush(timeout=math.ceil(timeout))  # nats-py takes whole seconds
    except Exception as e:  # closed or disconnected: redelivery covers what did not leave
        log.debug("settle: %s", e)
