"""The NATS wire, read and written with fewer steps than nats-py's public API takes.

nats-py turns every message into a header dict, a ``Msg`` and an item of the subscription's
queue, served by a task per message; it writes every header through a regex. For the paths
every message of every service takes, that is most of the cost. What the bus does instead,
on nats-py's own connection (nats-py still connects, reconnects, buffers and flushes):

- :func:`direct_deliveries`: chosen subscriptions get the raw message in the connection's
  read loop (the telemetry mirror, the consumer loops, the PubAcks of bus.publisher), with
  :func:`parse_headers` (one decode and one split per header block) and
  :func:`delivery_facts` (the counts of a delivery from its ack subject);
- :func:`ack`, and bus.publisher's ``HPUB``: written straight to the connection's outgoing
  buffer.

These use nats-py internals (``_process_msg``, ``_send_command``, ``_flush_pending``), each
checked against the installed nats-py (:func:`direct_deliveries` returns None,
``bus.publisher.fast_path`` False) with the public API as the fallback; tests cover both
ways, and tests/unit/test_wire.py fails when an upgrade drops one.
"""

from __future__ import annotations

import inspect
import logging
from typing import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError

log = logging.getLogger("chora.bus")


def _ack_numbers(reply: str) -> tuple[int, int, int, int, int]:
    """(delivered, stream seq, consumer seq, stored at ns, pending) from a JetStream ack subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the form with
    domain and account hash (two more tokens before the stream, one after)."""
    t = reply.split(".")
    if t[:2] == ["$JS", "ACK"]:
        if len(t) == 9:
            return int(t[4]), int(t[5]), int(t[6]), int(t[7]), int(t[8])
        if len(t) >= 12:
            return int(t[6]), int(t[7]), int(t[8]), int(t[9]), int(t[10])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def seq_of(reply: str) -> tuple[int, int, int]:
    """(stream sequence, consumer sequence, stored at ns) of a delivery, from its ack subject."""
    _, sseq, cseq, stored, _ = _ack_numbers(reply)
    return sseq, cseq, stored


def parse_headers(raw: bytes) -> tuple[str | None, dict[str, str]]:
    """(status code or None, headers) of a NATS header block ``NATS/1.0[ <code> <text>]\\r\\n
    Name: value\\r\\n...``, read as nats-py reads it: names as sent, values stripped, invalid
    UTF-8 replaced, the last of repeated names kept, names with whitespace or non-ASCII
    characters left out. One decode of the block, not one per line: about 2.5 times faster."""
    lines = raw.decode("utf-8", "replace").split("\r\n")
    first = lines[0]
    status = first[9:12] if first[8:9] == " " else None
    out: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip()
        if " " in name or "\t" in name or not name.isascii():
            continue
        out[name] = value.strip()
    return status, out


RawHandler = Callable[[bytes, bytes, bytes, "bytes | None"], Awaitable[None]]


def _direct_supported(nc: Client) -> bool:
    """Whether this nats-py dispatches messages as ``_process_msg(sid, subject, reply, data,
    headers)`` with raw bytes (nats-py 2.x), the hook :func:`direct_deliveries` wraps."""
    fn = getattr(type(nc), "_process_msg", None)
    if fn is None or not inspect.iscoroutinefunction(fn):
        return False
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["self", "sid", "subject", "reply", "data", "headers"]


def direct_deliveries(nc: Client) -> dict[int, RawHandler] | None:
    """The table (subscription id -> raw handler) of ``nc``'s direct deliveries, installed on
    first use; None when the installed nats-py does not dispatch as expected. Installing it
    also guards every subscription of the connection against messages nats-py cannot read
    (see ``process_msg``)."""
    table = getattr(nc, "_chora_direct", None)
    if table is not None:
        return table
    if not _direct_supported(nc):
        return None
    table = {}
    original = nc._process_msg

    async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        # The server stores and forwards subjects that are not UTF-8 (any client may publish
        # one, e.g. on a wildcard of the stream); nats-py decodes them strictly, and an error
        # here ends the connection's read loop for good: the client stays "connected" and reads
        # nothing more. So such a subject reaches every subscription with its bad bytes replaced,
        # and no failure of one message stops the reading of the next.
        if not subject.isascii():
            subject = subject.decode("utf-8", "replace").encode()
        if not reply.isascii():
            reply = reply.decode("utf-8", "replace").encode()
        try:
            handler = table.get(sid)
            if handler is None:
                await original(sid, subject, reply, data, headers)  # type: ignore[arg-type]
                return
            stats = nc.stats
            stats["in_msgs"] += 1
            stats["in_bytes"] += len(data)
            await handler(subject, reply, data, headers)
        except Exception:
            log.exception("a message on %r could not be dispatched: dropped (the reading goes on)", subject[:200])

    nc._process_msg = process_msg  # type: ignore[method-assign]
    nc._chora_direct = table  # type: ignore[attr-defined]
    return table


def delivery_facts(reply: str) -> tuple[int, int, int]:
    """(times delivered, stream sequence, messages pending) of a delivery, from its ack subject:
    what ``msg.metadata`` gives, without its dataclasses and datetime per message."""
    delivered, sseq, _, _, pending = _ack_numbers(reply)
    return delivered, sseq, pending


async def ack(nc: Client, msg: Msg) -> None:
    """``await msg.ack()``, written straight to the connection's outgoing buffer: the same
    ``PUB <reply> 0`` nats-py sends, without its subject checks and stats per message. Only
    for a client :func:`bus.publisher.fast_path` accepts."""
    if nc.is_closed:
        raise ConnectionClosedError
    reply = msg.reply
    if not reply:
        raise ValueError("no reply subject to acknowledge on")
    await nc._send_command(b"PUB %s 0\r\n\r\n" % reply.encode())
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()
    msg._ackd = True
