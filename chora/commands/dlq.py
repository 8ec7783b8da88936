"""`chora dlq`: look at dead letters and replay them.

    chora dlq list [--consumer C] [--limit N] [--json]
    chora dlq replay ID [ID ...]
    chora dlq replay --all [--consumer C]

``list`` prints one line per DLQ entry (``--json``: one JSON object per line), oldest first: the DLQ stream sequence
(the ID ``replay`` takes), when it was dead-lettered (UTC), the consumer, the
original subject, the code, the event type and id (from the preserved
``ce-*`` headers) and the reason. MAX_DELIVERIES advisories captured by the
DLQ stream are listed too (their event is read back from the events stream).

``replay`` re-publishes each entry to its original subject for the consumer
that failed, keeping the CloudEvent id, and deletes it from the DLQ once the
re-publish is stored; see :mod:`bus.dlq` for the duplicate window and for
which consumers see a replayed message.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Sequence, TextIO

from services.settings import Settings


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def format_line(dl) -> str:
    reason = " ".join(dl.reason.split())
    if dl.replay_of:
        reason += f" (replay of {dl.replay_of})"
    return "  ".join(
        [
            str(dl.seq),
            _when(dl.time),
            dl.consumer or "-",
            dl.subject or "-",
            dl.code or "-",
            dl.event_type or "-",
            dl.event_id or "-",
            reason or "-",
        ]
    )


def as_json(dl) -> dict:
    return {
        "seq": dl.seq,
        "time": dl.time,
        "consumer": dl.consumer,
        "subject": dl.subject,
        "code": dl.code,
        "reason": dl.reason,
        "event_id": dl.event_id,
        "event_type": dl.event_type,
        "stream_seq": dl.stream_seq,
        "deliveries": dl.deliveries,
        "advisory": dl.advisory,
        "replay_of": dl.replay_of,
    }


async def run_list(
    nc,
    settings: Settings,
    *,
    consumer: str | None = None,
    limit: int | None = None,
    as_json_lines: bool = False,
    out: TextIO | None = None,
) -> int:
    from bus.dlq import DlqError, list_dead_letters
    from bus.topology import Topology

    out = out or sys.stdout
    topo = Topology.from_settings(settings)
    try:
        entries = await list_dead_letters(nc.jetstream(), topo, consumer=consumer, limit=limit)
    except DlqError as e:
        print(f"chora: {e}", file=sys.stderr)
        return 1
    for dl in entries:
        out.write((json.dumps(as_json(dl)) if as_json_lines else format_line(dl)) + "\n")
    if not entries:
        print(
            f"chora: no dead letters in {topo.dlq_stream}" + (f" for {consumer}" if consumer else ""), file=sys.stderr
        )
    return 0


async def run_replay(
    nc,
    settings: Settings,
    *,
    ids: Sequence[int] = (),
    all_: bool = False,
    consumer: str | None = None,
    as_json_doc: bool = False,
    out: TextIO | None = None,
) -> int:
    from bus.dlq import DlqError, Replayed, replay, replay_all
    from bus.topology import Topology

    out = out or sys.stdout
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    done: list[Replayed] = []
    failed: list[tuple[int, str]] = []
    superseded: list[int] = []
    if all_:
        try:
            done, failed, superseded = await replay_all(js, topo, consumer=consumer)
        except DlqError as e:
            failed.append((0, str(e)))
    else:
        for seq in ids:
            try:
                done.append(await replay(js, topo, seq))
            except DlqError as e:
                failed.append((seq, str(e)))
    if as_json_doc:
        replayed = [
            {
                "seq": r.seq,
                "subject": r.subject,
                "stream_seq": r.stream_seq,
                "msg_id": r.msg_id,
                "duplicate": r.duplicate,
            }
            for r in done
        ]
        failures = [{"seq": seq or None, "reason": reason} for seq, reason in failed]
        out.write(json.dumps({"replayed": replayed, "deleted_advisories": superseded, "failed": failures}) + "\n")
    else:
        for r in done:
            note = " (already replayed: dropped as a duplicate)" if r.duplicate else ""
            out.write(f"replayed {r.seq} -> {r.subject} (stream seq {r.stream_seq}, Nats-Msg-Id {r.msg_id}){note}\n")
        for seq in superseded:
            out.write(f"deleted advisory {seq} (its dead letter was replayed)\n")
    for _seq, reason in failed:
        print(f"chora: {reason}", file=sys.stderr)
    if not (done or failed or superseded):
        print(
            f"chora: nothing to replay in {topo.dlq_stream}" + (f" for {consumer}" if consumer else ""), file=sys.stderr
        )
    return 1 if failed else 0


def _connected(run, args: argparse.Namespace) -> int:
    from chora.common import run_connected

    return run_connected(run, args)


def _list(args: argparse.Namespace) -> int:
    return _connected(
        lambda nc, settings: run_list(nc, settings, consumer=args.consumer, limit=args.limit, as_json_lines=args.json),
        args,
    )


def _replay(args: argparse.Namespace) -> int:
    from chora.common import EXIT_USAGE

    if bool(args.ids) == bool(args.all):
        print("chora: give dead letter ids, or --all", file=sys.stderr)
        return EXIT_USAGE
    if args.consumer and not args.all:
        print("chora: --consumer goes with --all", file=sys.stderr)
        return EXIT_USAGE
    return _connected(
        lambda nc, settings: run_replay(
            nc, settings, ids=args.ids, all_=args.all, consumer=args.consumer, as_json_doc=args.json
        ),
        args,
    )


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _consumer(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a consumer name (letters, digits, - and _)")
    return text


def register(subparsers) -> None:
    from chora.options import add_command

    dlq = subparsers.add_parser("dlq", help="dead letters: list and replay").add_subparsers(
        dest="dlq_cmd", required=True
    )

    sp = add_command(dlq, "list", connects=True, json=True, help="one line per dead letter, oldest first")
    sp.add_argument("--consumer", type=_consumer, help="only this consumer's (e.g. generator, notify-<subscription>)")
    sp.add_argument("--limit", type=_positive, help="at most N (the oldest)")
    sp.set_defaults(func=_list)

    sp = add_command(
        dlq,
        "replay",
        connects=True,
        json=True,
        help="re-publish dead letters for the consumer that failed, then delete them",
    )
    sp.add_argument(
        "ids", nargs="*", type=_positive, metavar="ID", help="DLQ stream sequence(s), from `chora dlq list`"
    )
    sp.add_argument("--all", action="store_true", help="every dead letter (of --consumer)")
    sp.add_argument("--consumer", type=_consumer, help="with --all: only this consumer's")
    sp.set_defaults(func=_replay)
