"""`chora assemble`, `chora batch run`, `chora batch status`: artifacts and batches from the command line.

- ``chora assemble ARTIFACT_ID [--context JSON|@file] [--output FILE] [--timeout S]``
  publishes a ``chora.artifact.requested``, waits for its ``artifact_assembled``
  and prints the content (or writes it to ``--output``). Exit 1 on an error
  outcome, 75 on timeout.
- ``chora batch run FILE [--timeout S]``: FILE (YAML or JSON) is
  ``{items: [{content_config_id, context}], context, continue_on_error}``;
  publishes a ``chora.batch.requested``, shows a progress bar following the
  batch's ``content_generated`` events, and a summary when its
  ``batch_completed`` arrives. Exit 0 if every item succeeded, 1 otherwise,
  75 on timeout, 130 on Ctrl-C (which says how to follow the batch: it goes on).
  Items beyond ``CHORA_CONTENT_THRESHOLD_BYTES`` travel in the Object Store
  (``items_ref``).
- ``chora batch status ID``: the batch's progress, read from its KV record; ID
  may be an unambiguous prefix (the 8 characters of the progress bar); exit 3 when
  no batch (or more than one) has it, as for ``batch results``.
- ``chora batch cancel`` and ``chora batch results``: :mod:`chora.commands.runs`.

The stream is followed from before the request is published, and re-read from
the last event seen after a reconnect, so the outcome cannot be missed; the
connection reconnects for as long as the command waits and says when it drops
and returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import msgspec

from chora.commands import runs
from chora.options import add_command
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
    parse_context,
    print_json,
    publish_request,
    request_and_wait,
    trace_id_or_exit,
)


# ---------------------------------------------------------------------- assemble
async def assemble(args: argparse.Namespace) -> int:
    from bus.content import ContentMissing, ContentStore
    from bus.topology import Topology
    from contracts.catalogue import ARTIFACT_ASSEMBLED, ARTIFACT_REQUESTED
    from contracts.envelope import new_event
    from contracts.events import ArtifactRequested

    settings = load_settings(args)
    trace_id = trace_id_or_exit(args, settings)
    try:
        data = msgspec.convert(
            {"artifact_id": args.artifact_id, "context": parse_context(args.context)}, ArtifactRequested
        )
    except msgspec.ValidationError as e:
        print(f"chora: {e}", file=sys.stderr)
        return EXIT_USAGE
    request = new_event(ARTIFACT_REQUESTED, data, source="chora://cli", trace_id=trace_id)
    link = Link()
    nc = await connect_cli(settings, link)
    try:
        js = nc.jetstream()
        ev = (await request_and_wait(nc, settings, link, request, [ARTIFACT_ASSEMBLED], args.timeout)).get(
            ARTIFACT_ASSEMBLED
        )
        if ev is None:
            print(
                f"chora: no outcome for artifact request {request.id} within {args.timeout}s "
                "(are the assembler, generator and validator running? the request stays queued)",
                file=sys.stderr,
            )
            if args.json:
                _assembled_json(request, None, "timeout")
            return EXIT_TIMEOUT
        out = ev.data
        content = out.content
        if out.status == "success" and content is None and out.content_ref:
            try:
                content = (
                    await ContentStore(js, Topology.from_settings(settings).content_bucket).get(out.content_ref)
                ).decode("utf-8")
            except ContentMissing as e:
                print(f"chora: the artifact's content is gone: {e}", file=sys.stderr)
                if args.json:
                    _assembled_json(request, ev, "error")
                return EXIT_FAILED
    finally:
        await close_cli(nc, link)
    print(f"trace_id={ev.traceid} request_id={request.id}", file=sys.stderr)
    if out.omitted_parts:
        print(f"chora: omitted optional parts: {', '.join(out.omitted_parts)}", file=sys.stderr)
    if out.status != "success":
        where = f" (part {out.failed_part})" if out.failed_part else ""
        err = out.error
        print(
            f"chora: assembly failed{where}: {err.code}: {err.message}" if err else f"chora: assembly failed{where}",
            file=sys.stderr,
        )
        if args.json:
            _assembled_json(request, ev, "error")
        return EXIT_FAILED
    content = content or ""
    if args.output:
        try:
            Path(args.output).write_text(content)
        except OSError as e:
            print(f"chora: cannot write {args.output}: {e.strerror}", file=sys.stderr)
            return EXIT_FAILED
        print(f"chora: wrote {len(content)} characters to {args.output}", file=sys.stderr)
        if args.json:
            _assembled_json(request, ev, "success", output=args.output)
        return 0
    if args.json:
        _assembled_json(request, ev, "success", content=content)
        return 0
    sys.stdout.write(content)
    if content and not content.endswith("\n"):
        sys.stdout.write("\n")
    return 0


def _assembled_json(request, ev, outcome: str, content: str | None = None, output: str | None = None) -> None:
    """`chora assemble --json`: one document; ``content`` is the artifact's (also when it
    travelled by reference), null when it went to ``--output`` or there is none."""
    print_json(
        {
            "request_id": request.id,
            "trace_id": ev.traceid if ev is not None else request.traceid,
            "outcome": outcome,
            "content": content,
            "output": output,
            "artifact_assembled": ev.data if ev is not None else None,
        }
    )


# ---------------------------------------------------------------------- batch run
def load_batch_file(path: str):
    """The BatchRequested in FILE (YAML or JSON); SystemExit with the reason if it is not one."""
    import yaml

    from contracts.events import BatchRequested

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"chora: cannot read batch file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        # libyaml's loader when PyYAML has it: about 3x faster on a 100,000-item file
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc = json.loads(text) if p.suffix == ".json" else yaml.load(text, Loader=loader)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SystemExit(
            f"chora: batch file {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}"
        ) from None
    if not isinstance(doc, dict):
        raise SystemExit(f"chora: batch file {path} must hold a mapping with 'items'")
    try:
        return msgspec.convert(doc, BatchRequested)
    except msgspec.ValidationError as e:
        raise SystemExit(f"chora: batch file {path}: {e}") from None


async def batch_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bus.content import ContentMissing, ContentStore
    from bus.topology import Topology
    from contracts.catalogue import BATCH_COMPLETED, BATCH_REQUESTED, CONTENT_GENERATED
    from contracts.envelope import new_event
    from contracts.events import BatchItemOutcome

    settings = load_settings(args)
    trace_id = trace_id_or_exit(args, settings)
    data = load_batch_file(args.file)
    request = new_event(BATCH_REQUESTED, data, source="chora://cli", trace_id=trace_id)
    total = len(data.items)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    link = Link()
    nc = await connect_cli(settings, link)
    seen: set[str] = set()
    counts = {"success": 0, "error": 0}
    progress = Progress(
        TextColumn("[bold]batch[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    task = progress.add_task(request.id[:8], total=total, failed=0)
    published = False
    try:
        done: asyncio.Event = asyncio.Event()
        completed: list = []

        def on_event(ev) -> None:
            if ev.type == BATCH_COMPLETED:
                if ev.data.batch_id == request.id and not completed:
                    completed.append(ev)
                    done.set()
                return
            o = ev.data.origin
            if o is None or o.kind != "batch" or o.id != request.id or o.key in seen:
                return
            seen.add(o.key)
            counts[ev.data.status] = counts.get(ev.data.status, 0) + 1
            progress.update(task, completed=len(seen), failed=counts["error"])

        follower = await follow(nc, settings, link, [CONTENT_GENERATED, BATCH_COMPLETED], on_event)
        js = nc.jetstream()
        store = ContentStore(js, Topology.from_settings(settings).content_bucket, settings.content_threshold_bytes)
        await publish_request(nc, settings, request, "the batch", content=store)  # many items travel by reference
        published = True
        err.print(f"batch {request.id}: {total} items")
        progress.start()
        try:
            await asyncio.wait_for(done.wait(), args.timeout)
        except asyncio.TimeoutError:
            progress.stop()
            print(
                f"chora: batch {request.id} not completed within {args.timeout}s ({len(seen)}/{total} outcomes seen); "
                f"it goes on: `chora batch status {request.id}`",
                file=sys.stderr,
            )
            if args.json:
                print_json(
                    {
                        "batch_id": request.id,
                        "trace_id": request.traceid,
                        "outcome": "timeout",
                        "seen": len(seen),
                        "batch_completed": None,
                        "items": None,
                    }
                )
            return EXIT_TIMEOUT
        c = completed[0].data
        progress.update(task, completed=c.total - c.skipped, failed=c.failed)
        progress.stop()
        await follower.stop()
        items = c.items
        if items is None and c.items_ref:
            try:
                items = msgspec.json.decode(await store.get(c.items_ref), type=list[BatchItemOutcome])
            except (ContentMissing, msgspec.DecodeError) as e:
                print(f"chora: the item outcomes are not readable: {e}", file=sys.stderr)
                items = None
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us, then raises KeyboardInterrupt
        progress.stop()
        if published:
            print(
                f"\nchora: interrupted; batch {request.id} goes on on the server.\n"
                f"Follow it with: chora batch status {request.id}",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        await close_cli(nc, link)
    if args.json:
        print_json(
            {
                "batch_id": request.id,
                "trace_id": completed[0].traceid,
                "outcome": "success" if c.status == "success" else "error",
                "seen": len(seen),
                "batch_completed": c,
                "items": items,  # the item outcomes, also when they travelled by reference (items_ref)
            }
        )
    else:
        print_summary(out, c, items)
    return 0 if c.status == "success" else EXIT_FAILED


def print_summary(console, completed, items, max_failed: int = 50) -> None:
    from rich.table import Table

    c = completed
    console.print(f"batch {c.batch_id}: {c.status}")
    t = Table(show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("status", c.status)
    t.add_row("total", str(c.total))
    t.add_row("successful", str(c.successful))
    t.add_row("failed", str(c.failed))
    t.add_row("skipped", str(c.skipped))
    t.add_row("duration", f"{c.duration_ms / 1000:.2f} s")
    console.print(t)
    failed = [i for i in (items or []) if i.status == "error"]
    if failed:
        ft = Table(title=f"failed items ({len(failed)})")
        ft.add_column("index", justify="right")
        ft.add_column("content config")
        ft.add_column("error code")
        ft.add_column("message", overflow="fold")
        for i in failed[:max_failed]:
            ft.add_row(
                str(i.index),
                i.content_config_id,
                i.error.code if i.error else "",
                (i.error.message if i.error else "")[:200],
            )
        console.print(ft)
        if len(failed) > max_failed:
            console.print(f"... and {len(failed) - max_failed} more")
    if c.error:
        console.print(f"{c.error.code}: {c.error.message}")


# ---------------------------------------------------------------------- batch status
async def batch_status(args: argparse.Namespace) -> int:
    from bus.state import StateStore
    from bus.topology import Topology
    from composition.batch_records import BatchLookupError, batch_progress, decode_batch, find_batch

    settings = load_settings(args)
    nc = await connect_cli(settings)
    try:
        try:
            store = StateStore(nc.jetstream(), Topology.from_settings(settings).state_bucket)
            batch_id, raw = await find_batch(store, args.batch_id)
        except BatchLookupError as e:  # unknown, or ambiguous: as `batch results` says it
            print(f"chora: {e}", file=sys.stderr)
            return EXIT_NOT_FOUND
    finally:
        await nc.close()
    st = batch_progress(batch_id, decode_batch(raw))
    if args.json:
        print_json(st)
        return 0
    state = "finished" if st["finished"] else ("closing" if st["closed"] else "running")
    print(f"batch {st['batch_id']}: {state}")
    print(f"  done        {st['done']}/{st['total']}")
    print(f"  successful  {st['successful']}")
    print(f"  failed      {st['failed']}")
    if st["closed"]:
        print(f"  skipped     {st['skipped']}")
    print(f"  finished    {'yes' if st['finished'] else 'no'}")
    print(f"  elapsed     {st['elapsed_s']:.2f} s")
    return 0


# ---------------------------------------------------------------------- registration
def register(sub) -> None:
    sp = add_command(sub, "assemble", connects=True, json=True, help="assemble an artifact from its parts and print it")
    sp.add_argument("artifact_id")
    sp.add_argument("--context", help="JSON object, or @file with one (over the artifact's defaults)")
    sp.add_argument("--output", "-o", help="write the content to this file instead of stdout")
    sp.add_argument("--trace-id")
    sp.add_argument("--timeout", type=float, default=60.0)
    sp.set_defaults(func=lambda a: asyncio.run(assemble(a)))

    bt = sub.add_parser("batch", help="generate many items as one batch").add_subparsers(
        dest="batch_cmd", required=True
    )
    sp = add_command(
        bt, "run", connects=True, json=True, help="run the batch in FILE (YAML or JSON) with a progress bar"
    )
    sp.add_argument("file")
    sp.add_argument("--trace-id")
    sp.add_argument("--timeout", type=float, default=600.0)
    sp.set_defaults(func=lambda a: asyncio.run(batch_run(a)))

    sp = add_command(bt, "status", connects=True, json=True, help="progress of a batch, from its state record")
    sp.add_argument("batch_id")
    sp.set_defaults(func=lambda a: asyncio.run(batch_status(a)))
    runs.register_batch(bt)  # cancel, results
