"""Runs already under way: cancel them, read a batch's results, an artifact run's state.

- ``chora batch cancel ID [--reason TEXT] [--wait [--timeout S]]`` and
  ``chora artifact cancel ID [...]`` publish a ``chora.cancel.requested``
  (:mod:`contracts.cancels`: its id is derived from the run, so asking twice is one
  request) and print what was asked. They do not wait by default: the assembler
  handles the cancel on its own consumer, and the completion says ``cancelled``.
  With ``--wait`` they follow the run's completion and print its status and counts.
  A batch ID may be an unambiguous prefix (as for ``batch status``).
- ``chora batch results ID [--failed-only] [--cursor N] [--limit N]``: the batch's
  item outcomes, read from its records (:func:`composition.batch_records.read_batch_page`,
  as the gateway reads them) while they are kept (the results TTL after it finished).
- ``chora artifact status ID``: an artifact run's state (running, closing, finished)
  and status, from its record.

Exit codes: 0 done (a cancel asked, or with ``--wait`` the run completed as cancelled);
1 the run had already completed, or completed otherwise than cancelled (the cancel came
too late); 3 no such run (unknown, not accepted yet, or expired) or its results expired;
64 a reason that is too long; 75 no completion within ``--timeout`` (the cancel stays
asked).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from chora.common import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Link,
    close_cli,
    connect_cli,
    follow,
    load_settings,
    print_json,
    publish_request,
)
from chora.options import add_command

if TYPE_CHECKING:
    from composition.runs import RunKind

REASON_MAX = 500  # contracts.events.CancelRequested.reason


async def _state(nc, settings):
    from bus.state import StateStore
    from bus.topology import Topology

    return StateStore(nc.jetstream(), Topology.from_settings(settings).state_bucket)


async def _resolve(store, kind: RunKind, run_id: str) -> tuple[str, dict[str, Any] | None, str]:
    """(full run id, its state or None when the assembler has no record of it, why not). A
    batch id may be an unambiguous prefix."""
    from composition.batch_records import BatchLookupError, find_batch
    from composition.runs import read_run

    why = f"no {kind} run {run_id} (unknown, not accepted yet, or expired)"
    if kind == "batch":
        try:
            run_id, _raw = await find_batch(store, run_id)
        except BatchLookupError as e:
            return run_id, None, f"{e}" if "ambiguous" in str(e) else why
    return run_id, await read_run(store, kind, run_id), why


def _completion_matches(kind: str, run_id: str, ev) -> bool:
    d = ev.data
    return (d.batch_id if kind == "batch" else d.request_id) == run_id


def _counts(kind: str, data) -> dict[str, Any]:
    if kind == "batch":
        out = {k: getattr(data, k) for k in ("total", "successful", "failed", "skipped")}
    else:
        out = {"parts_count": data.parts_count}
    out["compensated_parts"] = list(getattr(data, "compensated_parts", None) or [])
    return out


# ---------------------------------------------------------------------- cancel
async def cancel(args: argparse.Namespace, kind: RunKind) -> int:
    from composition.runs import read_run
    from contracts.cancels import cancel_request
    from contracts.catalogue import ARTIFACT_ASSEMBLED, BATCH_COMPLETED

    if args.reason is not None and len(args.reason) > REASON_MAX:
        print(f"chora: --reason has {len(args.reason)} characters; at most {REASON_MAX}", file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(args)
    link = Link()
    nc = await connect_cli(settings, link)
    doc: dict[str, Any] = {"kind": kind, "id": args.id, "reason": args.reason}
    try:
        store = await _state(nc, settings)
        run_id, run, why = await _resolve(store, kind, args.id)
        doc["id"] = run_id
        if run is None:
            print(f"chora: {why}", file=sys.stderr)
            return _done(args, doc, "not_found", EXIT_NOT_FOUND)
        completions: asyncio.Queue = asyncio.Queue()
        completion_type = BATCH_COMPLETED if kind == "batch" else ARTIFACT_ASSEMBLED
        follower = None
        if args.wait:  # from before the publish: the completion cannot slip by
            follower = await follow(
                nc,
                settings,
                link,
                [completion_type],
                lambda ev: completions.put_nowait(ev) if _completion_matches(kind, run_id, ev) else None,
            )
            run = await read_run(store, kind, run_id) or run  # it may have completed before the follower began
        if run["status"] is not None:
            if follower is not None:
                await follower.stop()
            doc["status"] = run["status"]
            print(f"chora: {kind} {run_id} has already completed ({run['status']}): nothing to cancel", file=sys.stderr)
            return _done(args, doc, "already_completed", EXIT_FAILED)
        try:
            request = cancel_request(kind, run_id, args.reason, source="chora://cli")
        except ValueError as e:
            print(f"chora: {e}", file=sys.stderr)
            return EXIT_USAGE
        await publish_request(nc, settings, request, "the cancel request")
        doc["cancel_id"] = request.id
        why = f" ({args.reason})" if args.reason else ""
        print(f"asked to cancel {kind} {run_id}{why}: cancel request {request.id}", file=sys.stderr)
        if follower is None:
            return _done(args, doc, "requested", 0)
        try:
            ev = await asyncio.wait_for(completions.get(), args.timeout)
        except asyncio.TimeoutError:
            print(
                f"chora: {kind} {run_id} did not complete within {args.timeout}s; the cancel stays asked "
                f"(is the assembler running?)",
                file=sys.stderr,
            )
            return _done(args, doc, "timeout", EXIT_TIMEOUT)
        finally:
            await follower.stop()
    finally:
        await close_cli(nc, link)
    status = ev.data.status
    doc.update(status=status, **_counts(kind, ev.data))
    if not args.json:
        counts = ", ".join(f"{k} {v}" for k, v in _counts(kind, ev.data).items() if k != "compensated_parts")
        print(f"{kind} {run_id}: {status} ({counts})")
        if doc["compensated_parts"]:
            print(f"  compensated: {', '.join(doc['compensated_parts'])}")
    if status != "cancelled":
        print(f"chora: {kind} {run_id} completed as {status} before the cancel took effect", file=sys.stderr)
    return _done(args, doc, "completed", 0 if status == "cancelled" else EXIT_FAILED)


def _done(args: argparse.Namespace, doc: dict[str, Any], outcome: str, code: int) -> int:
    if args.json:
        print_json({**doc, "outcome": outcome})
    return code


# ---------------------------------------------------------------------- batch results
async def batch_results(args: argparse.Namespace) -> int:
    from composition.batch_records import BatchLookupError, decode_batch, find_batch, read_batch_page

    if args.cursor < 0 or (args.limit is not None and args.limit < 1):
        print("chora: --cursor must be 0 or more and --limit 1 or more", file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(args)
    nc = await connect_cli(settings)
    try:
        store = await _state(nc, settings)
        try:
            batch_id, raw = await find_batch(store, args.batch_id)
            page = await read_batch_page(store, batch_id, decode_batch(raw), args.cursor, args.limit)
        except BatchLookupError as e:  # unknown, ambiguous, or its results expired
            print(f"chora: {e}", file=sys.stderr)
            return EXIT_NOT_FOUND
    finally:
        await nc.close()
    if args.failed_only:
        page["items"] = [i for i in page["items"] if i.get("status") == "error"]
    if args.json:
        print_json(page)
        return 0
    _print_page(page)
    return 0


def _print_page(page: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    t = Table(title=f"batch {page['batch_id']}: items {page['cursor']}.. of {page['total']}")
    for name, justify in (("index", "right"), ("status", "left"), ("content config", "left"), ("error", "left")):
        t.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for i in page["items"]:
        err = i.get("error") or {}
        message = f"{err.get('code')}: {(err.get('message') or '')[:200]}" if err else ""
        t.add_row(str(i["index"]), i["status"], i.get("content_config_id", ""), message)
    console.print(t)
    if page["next_cursor"] is not None:
        console.print(f"more: --cursor {page['next_cursor']}")


# ---------------------------------------------------------------------- artifact status
async def artifact_status(args: argparse.Namespace) -> int:
    from composition.runs import read_run

    settings = load_settings(args)
    nc = await connect_cli(settings)
    try:
        run = await read_run(await _state(nc, settings), "artifact", args.id)
    finally:
        await nc.close()
    if run is None:
        print(f"chora: no artifact run {args.id} (unknown, not accepted yet, or expired)", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        print_json(run)
    else:
        print(f"artifact {run['id']}: {run['state']}" + (f" ({run['status']})" if run["status"] else ""))
    return 0


# ---------------------------------------------------------------------- registration
def _cancel_command(group, kind: RunKind) -> None:
    sp = add_command(
        group,
        "cancel",
        connects=True,
        json=True,
        help=f"ask the assembler to cancel a {kind} run (chora.cancel.requested); --wait follows its completion",
    )
    sp.add_argument("id", help=f"the {kind} request id" + (" (or an unambiguous prefix)" if kind == "batch" else ""))
    sp.add_argument("--reason", help=f"why (at most {REASON_MAX} characters); carried on the cancel request")
    sp.add_argument("--wait", action="store_true", help="wait for the run's completion and print its status")
    sp.add_argument("--timeout", type=float, default=60.0, help="with --wait: seconds to wait (exit 75 past it)")
    sp.set_defaults(func=lambda a: asyncio.run(cancel(a, kind)))


def register_batch(bt) -> None:
    """`chora batch cancel` and `chora batch results` (the `batch` group is chora.commands.assembly's)."""
    _cancel_command(bt, "batch")
    sp = add_command(
        bt, "results", connects=True, json=True, help="a batch's item outcomes, while they are kept (results TTL)"
    )
    sp.add_argument("batch_id", help="the batch id (or an unambiguous prefix)")
    sp.add_argument("--failed-only", action="store_true", help="only the failed items (of the page)")
    sp.add_argument("--cursor", type=int, default=0, help="the first item index (default 0)")
    sp.add_argument("--limit", type=int, default=None, help="at most this many item indexes (default: all)")
    sp.set_defaults(func=lambda a: asyncio.run(batch_results(a)))


def register(sub) -> None:
    ar = sub.add_parser("artifact", help="artifact runs: cancel one, or show its state").add_subparsers(
        dest="artifact_cmd", required=True
    )
    _cancel_command(ar, "artifact")
    sp = add_command(ar, "status", connects=True, json=True, help="an artifact run's state, from its record")
    sp.add_argument("id", help="the artifact request id")
    sp.set_defaults(func=lambda a: asyncio.run(artifact_status(a)))
