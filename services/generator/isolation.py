"""Renders outside the event loop: a small pool of worker processes the OS keeps in bounds.

jinja2 renders are CPU-bound and their cost is the requester's to choose, so they run
in worker processes (``forkserver``: forked from a clean server that has jinja2 loaded),
never on the generator's event loop. Each worker

- limits its own address space (``RLIMIT_AS`` = its size at start + ``memory_mb``) and,
  before each render, its CPU time (``RLIMIT_CPU``, a backstop: the kernel kills a
  worker that spins on when its parent is gone or stuck);
- caches compiled templates by config id and template hash; the parent sends a
  template's source only to a worker that has not compiled that version;
- answers with msgpack (never pickle: the parent does not unpickle what a sandboxed
  worker wrote), and exits on end of input.

The parent enforces the wall-clock deadline (``timeout_s``, compile included): a worker
that passes it is killed (SIGKILL) and replaced, and the request gets one error outcome.
A worker that dies is replaced too; the pool never breaks as a whole.

Outcome codes of the isolation (besides the generator's own):

- ``RENDER_TIMEOUT``: the render ran past its wall-clock deadline (or its CPU limit); killed.
- ``RENDER_MEMORY``: the render passed its memory limit (the worker is replaced after).
- ``RENDER_FAILED``: the worker died for another reason (a signal, the OOM killer).

Fair sharing: a config whose render ran to the deadline in the last ``SLOW_MEMORY_S``
seconds is *slow*: its requests use at most ``workers - 1`` workers at once and wait
behind the others, so a flood of slow requests cannot take every worker from the
ordinary ones. While the app drains (SIGTERM), requests still waiting for a worker get
:class:`~contracts.handling.Retry` (nak'ed for another instance); running renders finish
or meet their deadline.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import pickle
import select
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from composition.configs import GenerationError, LoadedConfig
from contracts.handling import Retry
from services.generator.generators.base import MAX_OUTPUT_CHARS, _needs_template
from services.generator.generators.limits import MAX_RENDER_SECONDS

log = logging.getLogger("chora.generator")

SLOW_MEMORY_S = 60.0  # how long a config that ran to the deadline counts as slow
BOOT_TIMEOUT_S = 30.0  # a worker that is not ready after this long is killed
# A request handed back while stopping comes back after this long: past the consumer's drain,
# so it reaches another instance (or this one restarted) instead of bouncing off this one.
HANDBACK_DELAY_S = 5.0


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


# --------------------------------------------------------------------------- the worker


_encode_reply = msgspec.msgpack.Encoder().encode
_decode_reply = msgspec.msgpack.Decoder().decode


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
    """A worker's life: set its limits, then render jobs until its input ends."""
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
        while True:
            _serve(conn, gen, resource, limits.timeout_s + 1)
    except (EOFError, OSError):  # the parent closed our pipe (or is gone): done
        return
    except _Recycle:
        return


class _Recycle(Exception):
    """The worker ends after this job (it passed its memory limit): the parent starts another."""


def _serve(conn: Connection, gen: Any, resource: Any, cpu_s: float) -> None:
    """One job: read it, render it under a fresh CPU limit, answer."""
    encode = _encode_reply
    config_id, template_hash, name, source, context = pickle.loads(conn.recv_bytes())
    _limit_cpu(resource, cpu_s)
    code = "ok"
    try:
        tmpl = gen.compiled(config_id, template_hash)
        if tmpl is None:
            if source is None:
                raise GenerationError("GENERATOR_FAILED", f"{name}: the worker has no source for this template")
            tmpl = gen.compile_source(config_id, template_hash, name, source)
        reply = encode(("ok", gen.render_template(tmpl, name, context)))
    except GenerationError as e:
        code = e.code
        reply = encode(("error", e.code, e.message))
    except MemoryError:
        code = "RENDER_MEMORY"
        reply = encode(("error", code, f"{name}: the render passed its memory limit; stopped"))
    conn.send_bytes(reply)
    if code == "RENDER_MEMORY":
        raise _Recycle


# --------------------------------------------------------------------------- the parent's side


@dataclass(eq=False)
class _Worker:
    proc: Any
    conn: Connection
    known: dict[str, str | None] = field(default_factory=dict)  # config id -> template hash compiled

    loop: asyncio.AbstractEventLoop | None = None  # where our reader of its pipe is registered
    waiter: asyncio.Future[None] | None = None
    poller: Any = None
    booted: bool = False  # its "ready" was read

    def __post_init__(self) -> None:
        self.poller = select.poll()
        self.poller.register(self.conn.fileno(), select.POLLIN)

    @property
    def ready(self) -> bool:
        return self.proc.is_alive()

    def wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future done when the worker's answer is readable. The reader stays registered
        between renders (two epoll calls less per render); one with no waiter unregisters."""
        self.waiter = fut = loop.create_future()
        if self.loop is not loop:
            self.unwatch()
            loop.add_reader(self.conn.fileno(), self._readable)
            self.loop = loop
        return fut

    def _readable(self) -> None:
        if self.conn.closed or not self.poller.poll(0):
            return  # a stale call, queued before the last answer was read
        fut = self.waiter
        if fut is None or fut.done():
            self.unwatch()  # end of input of a dead worker: do not spin on it
        else:
            fut.set_result(None)

    def unwatch(self) -> None:
        if self.loop is not None and not self.loop.is_closed() and not self.conn.closed:
            self.loop.remove_reader(self.conn.fileno())
        self.loop = None




class RenderPool:
    """``workers`` processes rendering jinja2 templates; see the module's doc."""

    def __init__(self, limits: RenderLimits = RenderLimits()):
        self.limits = limits
        self._ctx = multiprocessing.get_context("forkserver")
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._waiting: collections.deque[tuple[asyncio.Future[_Worker], str]] = collections.deque()
        self._waiting_slow: collections.deque[tuple[asyncio.Future[_Worker], str]] = collections.deque()
        self._slow_until: dict[str, float] = {}
        self._slow_running = 0
        self._draining = False
        self.started = False
        self.kills = 0  # workers killed at their deadline (or replaced after dying)

    @property
    def size(self) -> int:
        return self.limits.size

    @property
    def slow_cap(self) -> int:
        return max(1, self.size - 1)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.started:
            return
        self._ctx.set_forkserver_preload(["services.generator.isolation", "services.generator.generators.jinja"])
        self._draining = False
        for _ in range(self.size):
            self._idle.append(self._spawn())
        self.started = True

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(child, self.limits), daemon=True, name="chora-render")
        proc.start()
        child.close()
        w = _Worker(proc, parent)
        self._all.add(w)
        return w

    def drain(self) -> None:
        """Stop taking work: requests waiting for a worker get Retry (nak'ed for another instance)."""
        self._draining = True
        for queue in (self._waiting, self._waiting_slow):
            while queue:
                fut, _ = queue.popleft()
                if not fut.done():
                    fut.set_exception(Retry("the generator is stopping", delay=HANDBACK_DELAY_S))

    def close(self, timeout: float = 2.0) -> None:
        """End every worker: end of input, then SIGKILL for one that does not exit in ``timeout``."""
        self.drain()
        workers, self._all, self._idle = list(self._all), set(), []
        for w in workers:
            w.conn.close()
        deadline = time.monotonic() + timeout
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(1.0)
        self.started = False

    # ------------------------------------------------------------------ scheduling
    def is_slow(self, config_id: str) -> bool:
        until = self._slow_until.get(config_id)
        if until is None:
            return False
        if until < time.monotonic():
            del self._slow_until[config_id]
            return False
        return True

    async def _acquire(self, config_id: str) -> tuple[_Worker, bool]:
        if self._draining or not self.started:
            raise Retry("the generator is stopping", delay=HANDBACK_DELAY_S)
        slow = self.is_slow(config_id)
        if self._idle and not self._waiting and (not slow or self._slow_running < self.slow_cap):
            w = self._idle.pop()
        else:
            fut: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
            (self._waiting_slow if slow else self._waiting).append((fut, config_id))
            try:
                w = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._release(fut.result(), False)  # handed to us as we were cancelled
                raise
            slow = self.is_slow(config_id)
        if slow:
            self._slow_running += 1
        return w, slow

    def _release(self, w: _Worker, slow: bool) -> None:
        if slow:
            self._slow_running -= 1
        if w not in self._all:  # closed meanwhile
            return
        if not w.ready:
            self._all.discard(w)
            w = self._spawn()
        self._idle.append(w)
        self._hand_out()

    def _hand_out(self) -> None:
        while self._idle:
            fut = self._next_waiter()
            if fut is None:
                return
            fut.set_result(self._idle.pop())

    def _next_waiter(self) -> asyncio.Future[_Worker] | None:
        while self._waiting:
            fut, config_id = self._waiting.popleft()
            if fut.done():
                continue
            if self.is_slow(config_id):  # it became slow while it waited: behind the others
                self._waiting_slow.append((fut, config_id))
                continue
            return fut
        while self._waiting_slow and self._slow_running < self.slow_cap:
            fut, _ = self._waiting_slow.popleft()
            if not fut.done():
                return fut
        return None

    # ------------------------------------------------------------------ a render
    async def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        """Render ``config`` with ``context`` in a worker; GenerationError on any failure."""
        source = _needs_template(config, "jinja2")
        w, slow = await self._acquire(config.id)
        try:
            return await self._run(w, config, source, context)
        finally:
            self._release(w, slow)

    async def _run(self, w: _Worker, config: LoadedConfig, source: str, context: dict[str, Any]) -> str:
        name = config.template_name
        known = w.known.get(config.id, False) == config.template_hash
        try:
            job = pickle.dumps((config.id, config.template_hash, name, None if known else source, context), 5)
        except Exception as e:
            raise GenerationError("INVALID_CONTEXT", f"the context cannot be sent to a render worker: {e}") from None
        loop = asyncio.get_running_loop()
        if not w.booted:
            await self._boot(w, loop, name)
        try:
            w.conn.send_bytes(job)
        except OSError:
            self._kill(w)
            raise GenerationError("RENDER_FAILED", f"{name}: the render worker was gone; try again") from None
        w.known[config.id] = config.template_hash
        ready = w.wait(loop)
        timer = loop.call_later(self.limits.timeout_s, ready.cancel)
        try:
            await ready
        except asyncio.CancelledError:
            if not ready.cancelled() or timer.when() > loop.time():  # our task was cancelled: state unknown
                self._kill(w)
                raise
            self._kill(w)
            self._slow_until[config.id] = time.monotonic() + SLOW_MEMORY_S
            raise GenerationError(
                "RENDER_TIMEOUT", f"{name}: the render took more than {self.limits.timeout_s:g} s; stopped"
            ) from None
        finally:
            timer.cancel()
        try:
            reply = _decode_reply(w.conn.recv_bytes(16 * self.limits.max_output_chars + 4096))
        except (EOFError, OSError, msgspec.DecodeError):
            raise self._died(w, config) from None
        if reply[0] == "ok" and isinstance(reply[1], str):
            return reply[1]
        if reply[0] == "error" and len(reply) == 3 and isinstance(reply[1], str) and isinstance(reply[2], str):
            if reply[1] == "RENDER_MEMORY":
                w.proc.join(1.0)  # it exits after saying so; _release starts another
            raise GenerationError(reply[1], reply[2])
        self._kill(w)
        raise GenerationError("RENDER_FAILED", f"{name}: the render worker answered nonsense")

    async def _boot(self, w: _Worker, loop: asyncio.AbstractEventLoop, name: str) -> None:
        """Wait for a new worker's "ready" (its start does not count against a render's deadline)."""
        ready = w.wait(loop)
        try:
            await asyncio.wait_for(ready, BOOT_TIMEOUT_S)
            ok = w.conn.recv_bytes(16) == b"ready"
        except (asyncio.TimeoutError, EOFError, OSError):
            ok = False
        if not ok:
            self._kill(w)
            raise GenerationError("RENDER_FAILED", f"{name}: a render worker did not start; try again")
        w.booted = True

    def _died(self, w: _Worker, config: LoadedConfig) -> GenerationError:
        w.proc.join(1.0)
        code = w.proc.exitcode
        self._kill(w)
        name = config.template_name
        if code == -signal.SIGXCPU:
            self._slow_until[config.id] = time.monotonic() + SLOW_MEMORY_S
            return GenerationError("RENDER_TIMEOUT", f"{name}: the render used its CPU limit; stopped")
        return GenerationError("RENDER_FAILED", f"{name}: the render worker died (exit code {code})")

    def _kill(self, w: _Worker) -> None:
        """SIGKILL and reap ``w`` (it is replaced when released)."""
        self.kills += 1
        w.unwatch()
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(1.0)
        w.conn.close()


class IsolatedJinja2:
    """The ``jinja2`` generator as the service uses it: every render goes through the pool."""

    name = "jinja2"

    def __init__(self, pool: RenderPool):
        self.pool = pool

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> Any:
        return self.pool.render(config, context)
