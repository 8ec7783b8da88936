"""Dead letters: a copy of the original message, with why it could not be handled.

The copy goes to ``<prefix>.dlq.<consumer>`` in the DLQ stream *before* the
original is terminated (``term()`` removes it from WorkQueue and Interest
streams). Its ``Nats-Msg-Id`` is derived from the original's stream sequence,
so dead-lettering the same message twice stores it once.

The copy keeps the original's own headers (``ce-*`` and the like), never the
``Nats-*`` control headers a publisher sent to JetStream (``Nats-Msg-Id``,
``Nats-Expected-Stream``, ...): those were about storing the original, and
carried into the DLQ publish they would make it fail. A message that was
itself a replay (``Chora-Replayed-From``) is stored with
``Chora-Dlq-Replay-Of: <dlq stream>:<dlq seq>``, the entry it was replayed
from, so a replay that fails again is one new entry linked to the old one.
"""

from __future__ import annotations

import time

from nats.aio.msg import Msg
from nats.js import JetStreamContext

DLQ_HEADER_PREFIX = "Chora-Dlq-"
H_REASON = "Chora-Dlq-Reason"
H_CODE = "Chora-Dlq-Code"
H_CONSUMER = "Chora-Dlq-Consumer"
H_STREAM = "Chora-Dlq-Stream"
H_SEQ = "Chora-Dlq-Stream-Seq"
H_SUBJECT = "Chora-Dlq-Subject"
H_DELIVERIES = "Chora-Dlq-Deliveries"
H_TIME = "Chora-Dlq-Time"
H_REPLAY_OF = "Chora-Dlq-Replay-Of"
# set by `chora dlq replay` on the re-published message (see bus.dlq)
H_REPLAY_FOR = "Chora-Replay-For"  # the one consumer that is to handle it
H_REPLAYED_FROM = "Chora-Replayed-From"  # <dlq stream>:<dlq seq>


def original_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """The headers of a message as its publisher meant them: without JetStream's ``Nats-*``
    control headers, the ``Chora-Dlq-*`` of a dead letter or the marks of a replay."""
    drop = (H_REPLAY_FOR.lower(), H_REPLAYED_FROM.lower())
    return {
        k: v
        for k, v in (headers or {}).items()
        if not k.lower().startswith(("nats-", DLQ_HEADER_PREFIX.lower())) and k.lower() not in drop
    }


def _header_safe(text: str, limit: int = 1024) -> str:
    text = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in text)
    return text[:limit]


async def dead_letter(js: JetStreamContext, dlq_subject: str, msg: Msg, code: str, reason: str) -> None:
    """Store the copy and wait for the PubAck. Raises if it could not be stored."""
    md = msg.metadata
    headers = original_headers(msg.headers)
    headers.update(
        {
            H_CODE: _header_safe(code, 64),
            H_REASON: _header_safe(reason),
            H_CONSUMER: md.consumer or "",
            H_STREAM: md.stream,
            H_SEQ: str(md.sequence.stream),
            H_SUBJECT: msg.subject,
            H_DELIVERIES: str(md.num_delivered),
            H_TIME: f"{time.time():.6f}",
            "Nats-Msg-Id": f"dlq:{md.stream}:{md.sequence.stream}:{md.consumer}",
        }
    )
    replayed_from = (msg.headers or {}).get(H_REPLAYED_FROM)
    if replayed_from:
        headers[H_REPLAY_OF] = _header_safe(replayed_from, 256)
    await js.publish(dlq_subject, msg.data, headers=headers, timeout=10.0)
