"""Dead letters: a copy of the original message, with why it could not be handled.

The copy goes to ``<prefix>.dlq.<consumer>`` in the DLQ stream *before* the
original is terminated (``term()`` removes it from WorkQueue and Interest
streams). Its ``Nats-Msg-Id`` is derived from the original's stream sequence,
so dead-lettering the same message twice stores it once.
"""

from __future__ import annotations

import time

from nats.aio.msg import Msg
from nats.js import JetStreamContext

H_REASON = "Chora-Dlq-Reason"
H_CODE = "Chora-Dlq-Code"
H_CONSUMER = "Chora-Dlq-Consumer"
H_STREAM = "Chora-Dlq-Stream"
H_SEQ = "Chora-Dlq-Stream-Seq"
H_SUBJECT = "Chora-Dlq-Subject"
H_DELIVERIES = "Chora-Dlq-Deliveries"
H_TIME = "Chora-Dlq-Time"


def _header_safe(text: str, limit: int = 1024) -> str:
    text = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in text)
    return text[:limit]


async def dead_letter(js: JetStreamContext, dlq_subject: str, msg: Msg, code: str, reason: str) -> None:
    """Store the copy and wait for the PubAck. Raises if it could not be stored."""
    md = msg.metadata
    headers = {k: v for k, v in (msg.headers or {}).items() if k != "Nats-Msg-Id"}
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
    await js.publish(dlq_subject, msg.data, headers=headers, timeout=10.0)
