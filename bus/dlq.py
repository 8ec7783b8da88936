"""Reading and replaying dead letters (the DLQ stream).

The DLQ stream holds two kinds of entries:

- dead letters stored by the consumer loop (:mod:`bus.deadletter`) on
  ``<prefix>.dlq.<consumer>``: the original headers and body plus the
  ``Chora-Dlq-*`` headers (code, reason, consumer, stream, stream seq,
  original subject, deliveries, time);
- ``MAX_DELIVERIES`` advisories the server publishes on
  ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<events stream>.<consumer>``
  when a consumer stops redelivering a message the loop could not settle
  (e.g. a process that died on the last delivery). They carry only the
  stream sequence: the original is read back from the events stream.

Replay re-publishes the original body and headers (minus ``Chora-Dlq-*`` and
JetStream's ``Nats-*`` control headers) to the original subject, so the
consumer that failed gets the message again, and deletes the DLQ entry only
once JetStream has acked the re-publish. Three details:

- Duplicate window. The event id doubles as ``Nats-Msg-Id``, so a re-publish
  with the same id inside the events stream's duplicate window would be
  dropped. A replay uses ``Nats-Msg-Id: <event id>:replay:<dlq seq>``: the
  CloudEvent id (``ce-id``) is unchanged, and replaying the same DLQ entry
  twice (a replay that crashed before deleting it) is still dropped once.
- Who gets it. A replayed message is stored on its subject again, so every
  consumer whose filter matches is offered it. The replay carries the header
  ``Chora-Replay-For: <consumer>`` (a NATS header, not part of the event):
  every other consumer loop acks it unhandled *before* decoding it
  (bus/consumer.py), so a message only its own consumer could not decode is
  not dead-lettered again by the others, and webhooks never see the mark.
- Misrouted callback requests. A request with a ``callback_url`` that came on
  the plain subject (code ``MISROUTED_CALLBACK``) was taken by no consumer: the
  loop refuses it before any handler. Replaying it to the same subject would be
  refused again, so it goes to the subject it should have come on
  (``<subject>.callback``), for every consumer of that subject (no
  ``Chora-Replay-For``): the notifier records its callback, the generator or the
  assembler handles it. Its ``Nats-Msg-Id`` is ``<event id>:rerouted``, so it is
  stored there once however many dead letters of it are replayed.
- Where it came from. ``Chora-Replayed-From: <dlq stream>:<dlq seq>``. If the
  replay fails again, the consumer stores one new dead letter with the new
  code and reason and ``Chora-Dlq-Replay-Of`` naming that entry
  (:attr:`DeadLetter.replay_of`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from bus.deadletter import (
    H_CODE,
    H_CONSUMER,
    H_DELIVERIES,
    H_REASON,
    H_REPLAY_FOR,
    H_REPLAY_OF,
    H_REPLAYED_FROM,
    H_SEQ,
    H_SUBJECT,
    H_TIME,
    original_headers,
)
from bus.topology import Topology
from contracts.catalogue import CALLBACK, MISROUTED_CALLBACK, type_of_subject

ADVISORY_PREFIX = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES."


class DlqError(Exception):
    """A dead letter could not be read or replayed; the message says which and why."""


@dataclass
class DeadLetter:
    seq: int  # sequence in the DLQ stream: the id `chora dlq replay` takes
    dlq_subject: str
    time: float | None  # when it was dead-lettered (unix seconds)
    consumer: str
    subject: str | None  # the original subject
    code: str
    reason: str
    event_id: str | None
    event_type: str | None
    stream_seq: int | None  # the original's sequence in the events stream
    deliveries: int | None
    advisory: bool = False
    replay_of: str | None = None  # "<dlq stream>:<dlq seq>" when a replay of that entry failed again
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # the original's (see original_headers)
    body: bytes | None = field(default=None, repr=False)  # None for an advisory whose original is gone


@dataclass
class Replayed:
    seq: int  # the DLQ entry
    subject: str
    stream_seq: int  # the new message in the events stream
    msg_id: str
    duplicate: bool  # JetStream had it already (an earlier replay of this entry)


def _header(headers: dict[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _get(js: JetStreamContext, stream: str, seq: int, subject: str | None = None) -> RawStreamMsg | None:
    """The message at ``seq`` (or the first at/after it on ``subject``); None if there is none."""
    try:
        if subject is None:
            return await js.get_msg(stream, seq=seq)
        return await js.get_msg(stream, seq=seq, next=True, subject=subject)
    except NotFoundError as e:
        if getattr(e, "err_code", None) == 10059:  # stream not found
            raise DlqError(f"stream {stream} does not exist (run `chora nats provision`)") from None
        return None


def _subject(raw: RawStreamMsg) -> str:
    """The subject a stored message was published to ("" if the server did not say)."""
    return raw.subject or ""


async def _from_advisory(js: JetStreamContext, topo: Topology, raw: RawStreamMsg) -> DeadLetter:
    try:
        adv = json.loads(raw.data or b"{}")
    except ValueError:
        adv = {}
    consumer = str(adv.get("consumer") or _subject(raw).rsplit(".", 1)[-1])
    stream_seq = adv.get("stream_seq") if isinstance(adv.get("stream_seq"), int) else None
    deliveries = adv.get("deliveries") if isinstance(adv.get("deliveries"), int) else None
    ts = raw.time.timestamp() if raw.time else None
    dl = DeadLetter(
        seq=raw.seq or 0,
        dlq_subject=_subject(raw),
        time=ts,
        consumer=consumer,
        subject=None,
        code="MAX_DELIVERIES",
        reason=f"server advisory: {consumer} gave up on stream seq {stream_seq} after {deliveries} deliveries",
        event_id=None,
        event_type=None,
        stream_seq=stream_seq,
        deliveries=deliveries,
        advisory=True,
    )
    if stream_seq is not None and adv.get("stream", topo.events_stream) == topo.events_stream:
        original = await _get(js, topo.events_stream, stream_seq)
        if original is not None:
            dl.subject = original.subject
            dl.headers = original_headers(original.headers)
            dl.replay_of = (original.headers or {}).get(H_REPLAYED_FROM)
            dl.body = original.data or b""
            dl.event_id = _header(dl.headers, "ce-id")
            dl.event_type = _header(dl.headers, "ce-type")
        else:
            dl.reason += " (the original is no longer in the events stream)"
    return dl


def _from_dead_letter(raw: RawStreamMsg) -> DeadLetter:
    h = dict(raw.headers or {})
    t = h.get(H_TIME)
    try:
        ts = float(t) if t else (raw.time.timestamp() if raw.time else None)
    except ValueError:
        ts = raw.time.timestamp() if raw.time else None
    return DeadLetter(
        seq=raw.seq or 0,
        dlq_subject=_subject(raw),
        time=ts,
        consumer=h.get(H_CONSUMER) or _subject(raw).rsplit(".", 1)[-1],
        subject=h.get(H_SUBJECT),
        code=h.get(H_CODE, ""),
        reason=h.get(H_REASON, ""),
        event_id=_header(h, "ce-id"),
        event_type=_header(h, "ce-type"),
        stream_seq=_int(h.get(H_SEQ)),
        deliveries=_int(h.get(H_DELIVERIES)),
        replay_of=h.get(H_REPLAY_OF),
        headers=original_headers(h),
        body=raw.data or b"",
    )


async def _decode(js: JetStreamContext, topo: Topology, raw: RawStreamMsg) -> DeadLetter:
    if _subject(raw).startswith(ADVISORY_PREFIX):
        return await _from_advisory(js, topo, raw)
    return _from_dead_letter(raw)


async def read(js: JetStreamContext, topo: Topology, seq: int) -> DeadLetter:
    raw = await _get(js, topo.dlq_stream, seq)
    if raw is None:
        raise DlqError(f"no dead letter {seq} in {topo.dlq_stream}")
    return await _decode(js, topo, raw)


async def _scan(js: JetStreamContext, topo: Topology, subject: str, limit: int | None) -> list[RawStreamMsg]:
    out: list[RawStreamMsg] = []
    seq = 1
    while limit is None or len(out) < limit:
        raw = await _get(js, topo.dlq_stream, seq, subject)
        if raw is None:
            break
        out.append(raw)
        seq = (raw.seq or seq) + 1
    return out


def filter_subjects(topo: Topology, consumer: str | None) -> list[str]:
    if consumer is None:
        return [">"]
    return [topo.dlq_subject(consumer), f"{ADVISORY_PREFIX}{topo.events_stream}.{consumer}"]


async def list_dead_letters(
    js: JetStreamContext, topo: Topology, *, consumer: str | None = None, limit: int | None = None
) -> list[DeadLetter]:
    """Dead letters (and advisories) in DLQ order, oldest first; at most ``limit``."""
    raws: list[RawStreamMsg] = []
    for subject in filter_subjects(topo, consumer):
        raws.extend(await _scan(js, topo, subject, limit))
    raws.sort(key=lambda r: r.seq or 0)
    if limit is not None:
        raws = raws[:limit]
    return [await _decode(js, topo, r) for r in raws]


def replay_msg_id(dl: DeadLetter, topo: Topology) -> str:
    base = dl.event_id or topo.dlq_stream
    if _rerouted(dl) and dl.event_id:
        return f"{base}:rerouted"
    return f"{base}:replay:{dl.seq}"


def _rerouted(dl: DeadLetter) -> bool:
    """A request with a callback_url that came on the plain subject: replayed on ``.callback``."""
    return dl.code == MISROUTED_CALLBACK and dl.subject is not None and not dl.subject.endswith("." + CALLBACK)


async def replay(js: JetStreamContext, topo: Topology, dl: DeadLetter | int) -> Replayed:
    """Re-publish one DLQ entry to its original subject, then delete it from the DLQ."""
    if isinstance(dl, int):
        dl = await read(js, topo, dl)
    if dl.body is None or dl.subject is None:
        raise DlqError(f"dead letter {dl.seq}: nothing to replay ({dl.reason})")
    rerouted = _rerouted(dl)  # no consumer took it: to the subject it belongs on, for every consumer there
    subject = f"{dl.subject}.{CALLBACK}" if rerouted else dl.subject
    if type_of_subject(subject, topo.prefix) is None:
        raise DlqError(f"dead letter {dl.seq}: subject {subject!r} is not one of {topo.events_stream}'s")
    headers = dict(dl.headers)
    msg_id = replay_msg_id(dl, topo)
    headers["Nats-Msg-Id"] = msg_id
    headers[H_REPLAYED_FROM] = f"{topo.dlq_stream}:{dl.seq}"
    if dl.consumer and not rerouted:
        headers[H_REPLAY_FOR] = dl.consumer
    try:
        ack = await js.publish(subject, dl.body, headers=headers, stream=topo.events_stream, timeout=10.0)
    except Exception as e:
        raise DlqError(f"dead letter {dl.seq}: re-publish to {subject} failed ({e}); it stays in the DLQ") from None
    try:
        await js.delete_msg(topo.dlq_stream, dl.seq)
    except NotFoundError:
        pass  # deleted meanwhile (another replay)
    except Exception as e:
        raise DlqError(
            f"dead letter {dl.seq}: re-published (stream seq {ack.seq}) but not deleted from the DLQ ({e}); "
            "replaying it again is dropped as a duplicate within the duplicate window"
        ) from None
    return Replayed(dl.seq, subject, ack.seq, msg_id, bool(ack.duplicate))


async def delete(js: JetStreamContext, topo: Topology, seq: int) -> None:
    try:
        await js.delete_msg(topo.dlq_stream, seq)
    except NotFoundError:
        pass


async def replay_all(
    js: JetStreamContext, topo: Topology, *, consumer: str | None = None
) -> tuple[list[Replayed], list[tuple[int, str]], list[int]]:
    """Replay every entry (of ``consumer``), oldest first.

    Returns (replayed, failures as (seq, reason), superseded advisories deleted
    because a dead letter of the same consumer and stream seq was replayed).
    """
    entries = await list_dead_letters(js, topo, consumer=consumer)
    letters = {(d.consumer, d.stream_seq) for d in entries if not d.advisory}
    done: list[Replayed] = []
    failed: list[tuple[int, str]] = []
    superseded: list[int] = []
    for dl in entries:
        if dl.advisory and (dl.consumer, dl.stream_seq) in letters:
            await delete(js, topo, dl.seq)
            superseded.append(dl.seq)
            continue
        try:
            done.append(await replay(js, topo, dl))
        except DlqError as e:
            failed.append((dl.seq, str(e)))
    return done, failed, superseded


__all__ = [
    "DeadLetter",
    "DlqError",
    "Replayed",
    "delete",
    "list_dead_letters",
    "read",
    "replay",
    "replay_all",
]
