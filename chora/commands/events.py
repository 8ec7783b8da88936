"""`chora events`: read the telemetry JSONL (no NATS needed).

    chora events query [--trace-id T] [--type TYPE] [--status S] [--since WHEN] [--until WHEN] [--file DIR_OR_FILE]
    chora events tail  [--trace-id T] [--type TYPE] [-n N] [--no-follow] [--file FILE]

``query`` reads the rotated files (``events-<day>-<seq>.jsonl.gz``, oldest
first) and then the live ``events.jsonl``, and prints every matching line as it
is stored: one JSON object per line, ready for ``jq``. ``WHEN`` is RFC3339
(``2025-01-31T12:00:00Z``; without an offset it is UTC; a bare date is its
midnight UTC) or a duration back from now (``90s``, ``15m``, ``2h``, ``7d``,
``1w``); it is compared with each line's ``timestamp`` (``--since`` inclusive,
``--until`` exclusive). ``--file`` is a directory (its live file and rotated
files) or one file (plain or ``.gz``). Unreadable lines are skipped and
counted on stderr; a file that cannot be read (a truncated ``.gz``) is
reported and the exit status is 1, after every readable line was printed.

``tail`` prints the live file (the last N matching lines with ``-n``), then
follows it. When the sink rotates the file (the path now names another inode)
or the file shrinks, tail first reads what is left of the file it has open
(the rotated file stays readable through the open descriptor even once it is
compressed and removed), then every file rotated after that one (several
rotations between two polls; found by their first lines), then continues from
the top of the new live file. A rotated file already deleted by retention
cannot be caught up: use ``query`` for history.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import msgspec

EXIT_FAILED, EXIT_USAGE = 1, 64
POLL_S = 0.2

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# ---------------------------------------------------------------------- filters
def _rfc3339(text: str) -> float:
    """POSIX time of an RFC3339 time (no offset: UTC); ValueError if it is not one."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = _dt.datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_dt.timezone.utc)
    return dt.timestamp()


def parse_when(arg: str, now: float | None = None) -> float:
    """``--since``/``--until``: RFC3339 or a duration back from now -> POSIX time."""
    m = _DURATION_RE.match(arg)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return _rfc3339(arg)
    except ValueError:
        raise ValueError(
            f"{arg!r} is neither RFC3339 (2025-01-31T12:00:00Z) nor a duration (90s, 15m, 2h, 7d, 1w)"
        ) from None


def _line_time(doc: dict) -> float | None:
    ts = doc.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        return _rfc3339(ts)
    except ValueError:
        return None


@dataclass
class Filter:
    trace_id: str | None = None
    event_type: str | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None

    @property
    def trivial(self) -> bool:
        return not (self.trace_id or self.event_type or self.status or self.since is not None or self.until is not None)

    def matches(self, doc: Any) -> bool:
        if not isinstance(doc, dict):
            return False
        if self.trace_id and doc.get("trace_id") != self.trace_id:
            return False
        if self.event_type and doc.get("event_type") not in (self.event_type, "chora." + self.event_type):
            return False
        if self.status and doc.get("status") != self.status:
            return False
        if self.since is not None or self.until is not None:
            t = _line_time(doc)
            if t is None:
                return False
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t >= self.until:
                return False
        return True


_decoder = msgspec.json.Decoder()


def _decode(line: bytes) -> Any:
    try:
        return _decoder.decode(line)
    except msgspec.DecodeError:
        return _BAD


_BAD = object()


# ---------------------------------------------------------------------- query
def _day_start(day: str) -> float:
    return _dt.datetime.fromisoformat(day).replace(tzinfo=_dt.timezone.utc).timestamp()


def query_files(target: Path, live_name: str, flt: Filter) -> list[Path]:
    """The files to read for ``target`` (a directory or one file), oldest first, leaving out
    rotated files that cannot hold a line in [since, until) judging by the days in their names."""
    from services.telemetry import rotation

    if not target.is_dir():
        return [target]
    live = target / live_name
    rotated = rotation.list_rotated(live)
    out = []
    for i, r in enumerate(rotated):
        # A rotated file's lines are between the start of its day and the first line of the
        # file after it (whose day is in its name; the live file's is not known: no skipping).
        if flt.until is not None and _day_start(r.day) >= flt.until:
            break
        if flt.since is not None and i + 1 < len(rotated):
            if _day_start(rotated[i + 1].day) + 86400 <= flt.since:
                continue
        out.append(r.path)
    if live.exists():
        out.append(live)
    return out


def query(files: Iterable[Path], flt: Filter, out: BinaryIO, err=None) -> int:
    from services.telemetry.rotation import open_lines

    err = err or sys.stderr
    status = 0
    for path in files:
        bad = 0
        try:
            with open_lines(path) as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        line += b"\n"  # a line being written, or torn: printed only if whole JSON
                    doc = _decode(line)
                    if doc is _BAD:
                        bad += 1
                        continue
                    if flt.trivial or flt.matches(doc):
                        out.write(line)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            print(f"chora: could not read all of {path}: {e}", file=err)
            status = EXIT_FAILED
        if bad:
            print(f"chora: {bad} unreadable line(s) in {path} skipped", file=err)
    out.flush()
    return status


def events_query(args: argparse.Namespace) -> int:
    from chora.common import load_settings

    settings = load_settings()
    try:
        now = time.time()
        since = parse_when(args.since, now) if args.since else None
        until = parse_when(args.until, now) if args.until else None
    except ValueError as e:
        print(f"chora: --since/--until: {e}", file=sys.stderr)
        return EXIT_USAGE
    flt = Filter(trace_id=args.trace_id, event_type=args.type, status=args.status, since=since, until=until)
    target = Path(args.file) if args.file else settings.jsonl_path.parent
    if not target.exists():
        print(f"chora: no events file or directory at {target}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return query(query_files(target, settings.jsonl_path.name, flt), flt, sys.stdout.buffer)
    except BrokenPipeError:  # `| head`
        _quiet_stdout()
        return 0


# ---------------------------------------------------------------------- tail
def _pause(seconds: float) -> bool:
    """Wait a poll interval; True: go on following."""
    time.sleep(seconds)
    return True


def follow(
    path: Path,
    flt: Filter,
    out: Callable[[list[bytes]], None],
    *,
    lines: int = 0,
    keep_following: bool = True,
    idle: Callable[[], bool] = lambda: _pause(POLL_S),
) -> int:
    """Print ``path`` (the last ``lines`` matching lines if > 0) then, with ``keep_following``,
    follow it across rotations until ``idle()`` (called when there is nothing new) returns False.

    ``out`` receives lists of whole lines (bytes, newline included)."""
    f: BinaryIO | None = None
    buf = b""

    def take(data: bytes, final: bool = False) -> list[bytes]:
        nonlocal buf
        buf += data
        if final:
            whole, buf = buf, b""
            if whole and not whole.endswith(b"\n"):
                whole += b"\n"  # the end of a rotated file: a torn line is dropped below
        else:
            cut = buf.rfind(b"\n") + 1
            whole, buf = buf[:cut], buf[cut:]
        keep = []
        for ln in whole.splitlines(keepends=True):
            doc = _decode(ln)
            if doc is not _BAD and (flt.trivial or flt.matches(doc)):
                keep.append(ln)
        return keep

    try:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            if not keep_following:
                raise
        if f is not None:
            first = take(f.read())
            if lines > 0:
                first = first[-lines:]
            if first:
                out(first)
        while keep_following:
            progressed = False
            if f is not None:
                chunk = f.read()
                if chunk:
                    got = take(chunk)
                    if got:
                        out(got)
                    progressed = True
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if f is None:
                if st is not None:
                    try:
                        f = open(path, "rb")
                        buf = b""
                        progressed = True
                    except FileNotFoundError:
                        pass
            elif st is not None:
                fst = os.fstat(f.fileno())
                if (st.st_ino, st.st_dev) != (fst.st_ino, fst.st_dev):
                    # Rotated: finish the old file (still readable through f), then any file
                    # rotated after it, then the new live file.
                    known = _fd_first_line(f)
                    got = take(f.read(), final=True)
                    if got:
                        out(got)
                    f.close()
                    f = None
                    while True:
                        known = _catch_up(path, known, lambda data: out(take(data, final=True)))
                        try:
                            f = open(path, "rb")
                        except FileNotFoundError:
                            break
                        newest = _newest_first_line(path)
                        if newest is None or newest in (known, _fd_first_line(f)):
                            break  # nothing was rotated between the catch-up and the open
                        f.close()
                        f = None
                    progressed = True
                elif st.st_size < f.tell():  # truncated in place: from the top
                    f.seek(0)
                    buf = b""
                    progressed = True
            if not progressed and not idle():
                break
    finally:
        if f is not None:
            f.close()
    return 0


def _fd_first_line(f: BinaryIO) -> bytes | None:
    head = os.pread(f.fileno(), 1 << 16, 0)
    nl = head.find(b"\n")
    return head[: nl + 1] if nl >= 0 else None


def _first_line(path: Path) -> bytes | None:
    from services.telemetry.rotation import open_lines

    try:
        with open_lines(path) as f:
            line = f.readline(1 << 16)
    except (OSError, EOFError):
        return None
    return line if line.endswith(b"\n") else None


def _newest_first_line(path: Path) -> bytes | None:
    from services.telemetry import rotation

    rotated = rotation.list_rotated(path)
    return _first_line(rotated[-1].path) if rotated else None


def _read_rotated(r) -> bytes:
    from services.telemetry.rotation import open_lines

    for p in (r.path, r.path.with_name(r.path.name + ".gz")) if not r.compressed else (r.path,):
        try:
            with open_lines(p) as f:  # the plain file may be compressed and removed meanwhile
                return f.read()
        except FileNotFoundError:
            continue
        except (OSError, EOFError) as e:
            print(f"chora: could not read {p}: {e}", file=sys.stderr)
            return b""
    return b""


def _catch_up(path: Path, known: bytes | None, emit: Callable[[bytes], None]) -> bytes | None:
    """Emit the rotated files written after the one whose first line is ``known`` (several
    rotations between two polls); return the first line of the last one emitted."""
    from services.telemetry import rotation

    if known is None:
        return None
    rotated = rotation.list_rotated(path)
    for i in range(len(rotated) - 1, -1, -1):
        if _first_line(rotated[i].path) == known:
            for r in rotated[i + 1 :]:
                data = _read_rotated(r)
                emit(data)
                nl = data.find(b"\n")
                if nl >= 0:
                    known = data[: nl + 1]
            return known
    return known  # not found (deleted by retention, or truncated in place): nothing to catch up


def events_tail(args: argparse.Namespace) -> int:
    from chora.common import load_settings

    settings = load_settings()
    path = Path(args.file) if args.file else settings.jsonl_path
    if not path.exists() and not args.follow:
        print(f"chora: no events file at {path}", file=sys.stderr)
        return EXIT_FAILED
    stdout = sys.stdout.buffer

    def emit(batch: list[bytes]) -> None:
        stdout.write(b"".join(batch))
        stdout.flush()

    flt = Filter(trace_id=args.trace_id, event_type=args.type)
    try:
        return follow(path, flt, emit, lines=args.lines, keep_following=args.follow)
    except FileNotFoundError:
        print(f"chora: no events file at {path}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    # Python would complain about the broken pipe again when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


# ---------------------------------------------------------------------- registration
def register(subparsers: Any) -> None:
    ev = subparsers.add_parser("events", help="read the telemetry JSONL").add_subparsers(
        dest="events_cmd", required=True
    )

    from chora.options import add_command

    # --json is accepted for uniformity: both already print JSON lines
    sp = add_command(
        ev, "tail", json=True, help="print events, then follow new ones across rotations (one JSON object per line)"
    )
    sp.add_argument("--trace-id")
    sp.add_argument("--type", help="event type, with or without the 'chora.' prefix")
    sp.add_argument("-n", "--lines", type=int, default=0, help="only the last N matching lines (0: all)")
    sp.add_argument("--no-follow", dest="follow", action="store_false", help="exit at the end of the file")
    sp.add_argument("--file", help="JSONL file (default: the telemetry sink's)")
    sp.set_defaults(func=events_tail)

    sp = add_command(
        ev,
        "query",
        json=True,
        help="print matching events from the rotated files and the live file, oldest first (JSON lines)",
    )
    sp.add_argument("--trace-id")
    sp.add_argument("--type", help="event type, with or without the 'chora.' prefix")
    sp.add_argument("--status", help="the line's status (success, error, ok, partial, ...)")
    sp.add_argument("--since", help="RFC3339 time or a duration back from now (15m, 2h, 7d); inclusive")
    sp.add_argument("--until", help="RFC3339 time or a duration back from now; exclusive")
    sp.add_argument(
        "--file",
        help="a directory (live + rotated files) or one .jsonl/.jsonl.gz file "
        "(default: the telemetry sink's directory)",
    )
    sp.set_defaults(func=events_query)
