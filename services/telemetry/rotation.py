"""Rotated JSONL files: naming, listing, compression, retention, reading.

The live file is ``<dir>/<stem><suffix>`` (``events.jsonl``). A rotation renames
it to ``<stem>-<UTC date>-<seq><suffix>`` (``events-2025-01-31-001.jsonl``),
where the date is the UTC day of the file's *first* line and ``seq`` counts the
rotations of that day from 1; then the renamed file is compressed to
``<that name>.gz``. So, for one live file, the rotated files in
(date, seq) order followed by the live file hold every line in the order it was
written.

Compression (:func:`compress`, run in a thread by the sink) writes
``<name>.gz.tmp`` (mode 0600), fsyncs it, renames it to ``<name>.gz`` (atomic:
a reader sees either no ``.gz`` or a whole one), gives it the plain file's
mtime, then removes the plain file. A crash at any point leaves either the
plain file (compressed again on the next start, the stale ``.tmp`` removed) or
both (the plain file is then removed).

Nothing here knows about events or NATS: these are file helpers shared by the
sink and ``chora events``.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger("chora.telemetry")

GZ = ".gz"
TMP = ".tmp"
_COPY_CHUNK = 1 << 20


def utc_day(ts: float) -> str:
    """The UTC date (``YYYY-MM-DD``) of a POSIX timestamp."""
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d")


def _split(live: Path) -> tuple[str, str]:
    name = live.name
    suffix = live.suffix or ""
    return (name[: -len(suffix)] if suffix else name), suffix


def rotated_name(live: Path, day: str, seq: int) -> Path:
    stem, suffix = _split(live)
    return live.with_name(f"{stem}-{day}-{seq:03d}{suffix}")


@dataclass(frozen=True, order=True)
class Rotated:
    """A rotated file of a live file: ``path`` is the ``.gz`` when compressed, else the plain file."""

    day: str
    seq: int
    compressed: bool
    path: Path


def _pattern(live: Path) -> re.Pattern[str]:
    stem, suffix = _split(live)
    return re.compile("^" + re.escape(stem) + r"-(\d{4}-\d{2}-\d{2})-(\d+)" + re.escape(suffix) + r"(\.gz)?(\.tmp)?$")


def list_rotated(live: Path, *, include_tmp: bool = False) -> list[Rotated]:
    """The rotated files of ``live``, oldest first. A rotation present both plain and
    compressed (a crash between the rename of the ``.gz`` and the removal of the plain
    file) is listed once, as the compressed one. ``.gz.tmp`` files only with ``include_tmp``."""
    pat = _pattern(live)
    try:
        names = os.listdir(live.parent)
    except FileNotFoundError:
        return []
    found: dict[tuple[str, int], Rotated] = {}
    tmps: list[Rotated] = []
    for n in names:
        m = pat.match(n)
        if not m:
            continue
        day, seq, gz, tmp = m.group(1), int(m.group(2)), bool(m.group(3)), bool(m.group(4))
        r = Rotated(day, seq, gz, live.parent / n)
        if tmp:
            if include_tmp:
                tmps.append(r)
            continue
        prev = found.get((day, seq))
        if prev is None or (gz and not prev.compressed):
            found[(day, seq)] = r
    return sorted(list(found.values()) + tmps)


def next_seq(live: Path, day: str) -> int:
    """The sequence number of the next rotation of ``day`` (one past any file of that day)."""
    seqs = [r.seq for r in list_rotated(live, include_tmp=True) if r.day == day]
    return max(seqs, default=0) + 1


def compress(plain: Path, *, fsync: bool = True) -> Path:
    """Gzip ``plain`` to ``plain.gz`` atomically (see the module docstring); return the ``.gz``.

    Blocking: the sink runs it in a thread.
    """
    gz = plain.with_name(plain.name + GZ)
    tmp = gz.with_name(gz.name + TMP)
    st = os.stat(plain)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with open(fd, "wb", closefd=False) as raw, open(plain, "rb") as src:
            # mtime=0: the same input gives the same bytes; the name carries no secret.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as z:
                shutil.copyfileobj(src, z, _COPY_CHUNK)
            raw.flush()
            if fsync:
                os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, gz)
    os.utime(gz, ns=(st.st_atime_ns, st.st_mtime_ns))
    if fsync:
        _fsync_dir(gz.parent)
    os.unlink(plain)
    return gz


def _fsync_dir(d: Path) -> None:
    try:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def apply_retention(live: Path, keep: int) -> list[Path]:
    """Delete the oldest rotated files of ``live`` beyond the newest ``keep``; return what went."""
    if keep < 0:
        return []
    rotated = list_rotated(live)
    doomed = rotated[: max(0, len(rotated) - keep)]
    gone = []
    for r in doomed:
        for p in (r.path, r.path.with_name(r.path.name[: -len(GZ)]) if r.compressed else None):
            if p is None:
                continue
            try:
                os.unlink(p)
                gone.append(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("telemetry sink: could not delete old file %s: %s", p, e)
    return gone


def recover(live: Path, *, fsync: bool = True) -> list[Path]:
    """After a crash: remove stale ``.gz.tmp`` files, remove a plain file whose ``.gz`` exists,
    compress plain rotated files. Blocking. Returns the compressed files produced."""
    pat = _pattern(live)
    try:
        names = set(os.listdir(live.parent))
    except FileNotFoundError:
        return []
    made = []
    for n in sorted(names):
        m = pat.match(n)
        if not m:
            continue
        p = live.parent / n
        if m.group(4):  # .tmp: an interrupted compression
            _unlink_quiet(p)
        elif not m.group(3):  # a plain rotated file
            if n + GZ in names:
                _unlink_quiet(p)
            else:
                try:
                    made.append(compress(p, fsync=fsync))
                except OSError as e:
                    log.error("telemetry sink: could not compress %s: %s", p, e)
    return made


def _unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def open_lines(path: Path):
    """A binary file object over the (decompressed) lines of ``path``."""
    if path.name.endswith(GZ):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_files(live: Path) -> Iterator[Path]:
    """Every file holding lines of ``live``, oldest first: the rotated ones, then ``live``."""
    for r in list_rotated(live):
        yield r.path
    if live.exists():
        yield live
