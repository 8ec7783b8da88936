"""The render worker: the process side of :mod:`services.generator.isolation`.

A worker limits its own address space (``RLIMIT_AS``) and core dumps, clears its
environment, says "ready", then renders the batches of jobs its parent sends (pickle in,
from the parent; msgpack out, never pickle: the parent does not unpickle what a sandboxed
worker wrote), each under a fresh CPU limit (``RLIMIT_CPU``, a backstop for a worker whose
parent is gone or stuck), until its input ends. Kept apart from the parent's side, which
the forkserver preloads with it, so that each file stays about one thing.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from composition.configs import GenerationError
from services.generator.generators.base import MAX_OUTPUT_CHARS
from services.generator.generators.limits import MAX_RENDER_SECONDS


@dataclass(frozen=True)
class RenderLimits:
    """What one render may take. ``workers`` 0: one per core (at least 2)."""

    workers: int = 0
    timeout_s: float = MAX_RENDER_SECONDS
    memory_mb: int = 512
    max_output_chars: int = MAX_OUTPUT_CHARS

    @property
    def size(self) -> int:
        return self.workers if self.workers > 0 else max(2, os.cpu_count() or 1)


_encode_reply = msgspec.msgpack.Encoder().encode
decode_reply = msgspec.msgpack.Decoder().decode


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _limit_cpu(resource: Any, seconds: float) -> None:
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(used.ru_utime + used.ru_stime + seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))


def worker_main(conn: Connection, limits: RenderLimits) -> None:
    """A worker's life: set its limits, then render batches of jobs until its input ends."""
    import resource

    from services.generator.generators.jinja import Jinja2Generator

    for sig in (signal.SIGINT, signal.SIGTERM):  # sent to the process group: the parent decides
        signal.signal(sig, signal.SIG_IGN)
    os.environ.clear()  # nothing for a sandbox escape to find
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.memory_mb > 0:
        cap = _vm_bytes() + (limits.memory_mb << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    gen = Jinja2Generator(limits.max_output_chars)
    try:
        conn.send_bytes(b"ready")  # the deadline of the first job starts after the worker's own start
        while _serve(conn, gen, resource, limits.timeout_s + 1):
            pass
    except (EOFError, OSError):  # the parent closed our pipe (or is gone): done
        return


def _render(gen: Any, config_id: str, template_hash: str | None, name: str, source: str | None, context: Any) -> tuple:
    try:
        tmpl = gen.compiled(config_id, template_hash)
        if tmpl is None:
            if source is None:
                raise GenerationError("GENERATOR_FAILED", f"{name}: the worker has no source for this template")
            tmpl = gen.compile_source(config_id, template_hash, name, source)
        t0 = time.thread_time()
        text = gen.render_template(tmpl, name, context)
        # the render's own CPU time (a preemption does not count): what a cache hit would save
        return ("ok", text, time.thread_time() - t0)
    except GenerationError as e:
        return ("error", e.code, e.message)
    except MemoryError:
        return ("error", "RENDER_MEMORY", f"{name}: the render passed its memory limit; stopped")


def _serve(conn: Connection, gen: Any, resource: Any, cpu_s: float) -> bool:
    """One batch of jobs, each rendered under a fresh CPU limit and answered as soon as it is
    done (the parent times each job from the previous answer, so it knows which one ran long).
    After a memory error the rest of the batch is handed back and the worker ends (False)."""
    jobs = pickle.loads(conn.recv_bytes())
    recycle = False
    for job in jobs:
        if recycle:
            conn.send_bytes(_encode_reply(("again",)))
            continue
        _limit_cpu(resource, cpu_s)
        reply = _render(gen, *job)
        recycle = reply[1] == "RENDER_MEMORY"
        conn.send_bytes(_encode_reply(reply))
    return not recycle
