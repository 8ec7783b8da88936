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

(The worker's side is :mod:`services.generator.render_worker`; this module is the parent's.)

The parent enforces the wall-clock deadline (``timeout_s``, compile included): a worker
that passes it is killed (SIGKILL) and replaced, and the request gets one error outcome.
A worker that dies is replaced too; the pool never breaks as a whole. Workers that cannot
start (the machine out of memory or processes) are not replaced in a tight loop: after
``BOOT_FAILURES_MAX`` in a row the requests that waited for them are handed back
(:class:`~contracts.handling.Retry`: another instance may take them, and the consumer's
``max_deliver`` bounds the attempts), and each replacement waits longer, up to
``BOOT_BACKOFF_MAX_S``; the first worker that starts again ends that.

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
import itertools
import logging
import multiprocessing
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
from services.generator.costs import RenderCosts
from services.generator.generators.base import _needs_template
from services.generator.generators.jinja import Jinja2Generator
from services.generator.render_worker import RenderLimits, decode_reply, worker_main

log = logging.getLogger("chora.generator")

SLOW_MEMORY_S = 60.0  # how long a config that ran to the deadline counts as slow
BOOT_TIMEOUT_S = 30.0  # a worker that is not ready after this long is killed
BOOT_FAILURES_MAX = 3  # workers in a row that did not start, before waiting requests are handed back
BOOT_BACKOFF_S = 0.1  # the wait before replacing a worker that did not start, doubled each time in a row
BOOT_BACKOFF_MAX_S = 30.0
# A request handed back while stopping comes back after this long: past the consumer's drain,
# so it reaches another instance (or this one restarted) instead of bouncing off this one.
HANDBACK_DELAY_S = 5.0
MAX_BATCH = 32  # jobs one worker takes at once
# A queue is split between idle workers only into shares of at least this much render time:
# waking a second worker costs more than it saves for a few renders of tens of microseconds.
MIN_SHARE_S = 0.001


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
    retiring: bool = False  # it passed its memory limit: it ends after its batch

    def __post_init__(self) -> None:
        self.poller = select.poll()
        self.poller.register(self.conn.fileno(), select.POLLIN)

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future done when the worker's next message is readable. The reader stays
        registered between batches; one with no waiter unregisters."""
        self.waiter = fut = loop.create_future()
        if self.loop is not loop:
            self.unwatch()
            loop.add_reader(self.conn.fileno(), self._readable)
            self.loop = loop
        return fut

    def _readable(self) -> None:
        if self.conn.closed or not self.poller.poll(0):
            return  # a stale call, queued before the last message was read
        fut = self.waiter
        if fut is None or fut.done():
            self.unwatch()  # end of input of a dead worker: do not spin on it
        else:
            fut.set_result(None)

    def unwatch(self) -> None:
        if self.loop is not None and not self.loop.is_closed() and not self.conn.closed:
            self.loop.remove_reader(self.conn.fileno())
        self.loop = None


@dataclass(eq=False)
class _Job:
    config: LoadedConfig
    source: str
    context: dict[str, Any]
    future: asyncio.Future[str]

    def wire(self, w: _Worker) -> tuple:
        c = self.config
        known = w.known.get(c.id, False) == c.template_hash
        w.known[c.id] = c.template_hash
        return (c.id, c.template_hash, c.template_name, None if known else self.source, self.context)

    def fail(self, code: str, message: str) -> None:
        if not self.future.done():
            self.future.set_exception(GenerationError(code, message))

    def hand_back(self, why: str = "the generator is stopping") -> None:
        """Retry: the request is nak'ed, for another instance or a later try."""
        if not self.future.done():
            self.future.set_exception(Retry(why, delay=HANDBACK_DELAY_S))


class RenderPool:
    """``workers`` processes rendering jinja2 templates; see the module's doc.

    Jobs queue in the pool; an idle worker takes a batch of them (up to MAX_BATCH, shared
    between the idle workers in shares of at least MIN_SHARE_S of known render time), so
    under load one wake-up of a worker serves many renders.
    Each job still has its own deadline, counted from the previous answer of its worker.
    """

    def __init__(self, limits: RenderLimits = RenderLimits(), *, target: Any = None):
        self.limits = limits
        self._target = target or worker_main  # what a worker process runs (tests give one that fails)
        self.boot_failures = 0  # workers in a row that did not start
        self.spawned = 0  # worker processes started, replacements included
        self._epoch = 0  # counts closes: a replacement timed before a close does not run after it
        self._ctx = multiprocessing.get_context("forkserver")
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._queue: collections.deque[_Job] = collections.deque()
        self._slow_queue: collections.deque[_Job] = collections.deque()
        self._slow_until: dict[str, float] = {}
        self._slow_running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._pump_soon = False  # a _pump is scheduled for the end of this turn of the loop
        self.started = False
        self.kills = 0  # workers this pool killed (at a deadline, or its render was cancelled)
        self.costs = RenderCosts()  # what each config version's renders cost in the workers

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
        self._ctx.set_forkserver_preload(["services.generator.render_worker", "services.generator.generators.jinja"])
        self._draining = False
        for _ in range(self.size):
            self._idle.append(self._spawn())
        self.started = True

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=self._target, args=(child, self.limits), daemon=True, name="chora-render")
        try:
            proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.spawned += 1
        w = _Worker(proc, parent)
        self._all.add(w)
        return w

    def drain(self) -> None:
        """Stop taking work: requests waiting for a worker get Retry (nak'ed for another instance)."""
        self._draining = True
        for queue in (self._queue, self._slow_queue):
            while queue:
                queue.popleft().hand_back()

    def detach(self) -> None:
        """On the event loop, before :meth:`close` runs in a thread (it blocks while workers
        exit): hand back what waits, stop watching the workers' pipes, and let no replacement
        timed before now start one. What touches the loop is done here, not from the thread."""
        self.drain()
        self._epoch += 1
        for w in self._all:
            w.unwatch()

    def close(self, timeout: float = 2.0) -> None:
        """End every worker: end of input, then SIGKILL for one that does not exit in ``timeout``.
        Called on the loop, or in a thread after :meth:`detach` (as the generator does)."""
        self.detach()  # (after a detach: nothing waits and no pipe is watched; the loop is not touched)
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

    async def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        """Render ``config`` with ``context`` in a worker; GenerationError on any failure."""
        if self._draining or not self.started:
            raise Retry("the generator is stopping", delay=HANDBACK_DELAY_S)
        source = _needs_template(config, "jinja2")
        loop = asyncio.get_running_loop()
        job = _Job(config, source, context, loop.create_future())
        (self._slow_queue if self.is_slow(config.id) else self._queue).append(job)
        if not self._pump_soon:
            # Hand the queue to the workers at the end of this turn of the loop, not now: the
            # renders asked for in the same turn (a read of many deliveries) go as one batch,
            # one pipe write and one wake-up of a worker, instead of a batch each.
            self._pump_soon = True
            loop.call_soon(self._pump_now)
        return await job.future

    def _pump_now(self) -> None:
        self._pump_soon = False
        self._pump()

    def _pump(self) -> None:
        """Hand queued jobs to idle workers."""
        while self._idle:
            batch, slow = self._take()
            if not batch:
                return
            w = self._idle.pop()
            if slow:
                self._slow_running += 1
            task = asyncio.get_running_loop().create_task(self._run_batch(w, batch, slow))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> tuple[list[_Job], bool]:
        """The next batch: ordinary jobs first (a share of the queue per idle worker, but no
        share under :data:`MIN_SHARE_S` of known render time), else one slow job if the slow
        ones hold fewer than ``slow_cap`` workers."""
        share = -(-len(self._queue) // len(self._idle))
        if share < len(self._queue):
            # past the even share only while the jobs' measured costs add up to less than
            # MIN_SHARE_S (a job of unknown cost ends it): cheap renders go to one worker, and
            # at most that much cheap work goes ahead of a costly one in its batch
            total, cheap = 0.0, 0
            for job in itertools.islice(self._queue, MAX_BATCH):
                cost = self.costs.get(job.config)
                if cost is None:
                    break
                total += cost
                cheap += 1
                if total >= MIN_SHARE_S:
                    break
            share = max(share, cheap)
        share = min(MAX_BATCH, share)
        batch: list[_Job] = []
        while self._queue and len(batch) < share:
            job = self._queue.popleft()
            if job.future.done():
                continue
            if self.is_slow(job.config.id):  # it became slow while it waited: behind the others
                self._slow_queue.append(job)
                continue
            batch.append(job)
        if batch:
            return batch, False
        while self._slow_queue and self._slow_running < self.slow_cap:
            job = self._slow_queue.popleft()
            if not job.future.done():
                return [job], True
        return [], False

    def _requeue(self, jobs: list[_Job]) -> None:
        """Jobs a worker did not get to: back to the front of their queue."""
        for job in reversed(jobs):
            if job.future.done():
                continue
            if self._draining:  # no worker may come back for it: hand it back now
                job.hand_back()
            else:
                (self._slow_queue if self.is_slow(job.config.id) else self._queue).appendleft(job)

    # ------------------------------------------------------------------ a batch in a worker
    async def _run_batch(self, w: _Worker, jobs: list[_Job], slow: bool) -> None:
        loop = asyncio.get_running_loop()
        done = 0
        try:
            if not w.booted and not await self._boot(w, loop):
                if self.boot_failures >= BOOT_FAILURES_MAX:
                    for job in jobs:  # not back to the queue: no worker starts to take them
                        job.hand_back(f"render workers cannot start ({self.boot_failures} in a row)")
                    done = len(jobs)
                return
            try:
                w.conn.send_bytes(pickle.dumps([job.wire(w) for job in jobs], 5))
            except OSError:
                self._kill(w)
                return
            except Exception as e:  # a context pickle cannot carry (JSON always can)
                for job in jobs:
                    job.fail("INVALID_CONTEXT", f"the context cannot be sent to a render worker: {e}")
                done = len(jobs)
                return
            while done < len(jobs):
                replies = await self._next(w, loop, jobs[done], len(jobs) - done)
                if replies is None:
                    done += 1  # that job failed; the worker is gone
                    return
                for reply in replies[: len(jobs) - done]:
                    if isinstance(reply, list) and reply[1:2] == ["RENDER_MEMORY"]:
                        w.retiring = True  # it ends after this batch
                    self._settle(jobs[done], reply)
                    done += 1
        finally:
            self._requeue(jobs[done:])
            if slow:
                self._slow_running -= 1
            self._release(w, answered=done == len(jobs))

    async def _next(self, w: _Worker, loop: asyncio.AbstractEventLoop, job: _Job, left: int) -> list | None:
        """The worker's next answers, or None when ``job`` met its deadline or the worker died."""
        ready = w.wait(loop)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            ready.cancel()

        timer = loop.call_later(self.limits.timeout_s, expire)
        try:
            await ready
        except asyncio.CancelledError:
            self._kill(w)
            if not expired:
                raise  # the loop is shutting down
            self._slow_until[job.config.id] = time.monotonic() + SLOW_MEMORY_S
            job.fail(
                "RENDER_TIMEOUT",
                f"{job.config.template_name}: the render took more than {self.limits.timeout_s:g} s; stopped",
            )
            return None
        finally:
            timer.cancel()
        replies: list[Any] = []
        try:
            while True:  # every answer already there, in one go
                replies.append(decode_reply(w.conn.recv_bytes(16 * self.limits.max_output_chars + 4096)))
                if len(replies) >= left or not w.poller.poll(0):
                    return replies
        except (EOFError, OSError, msgspec.DecodeError):
            if replies:
                return replies  # the next read finds the end again, for the job it concerns
            self._died(w, job)
            return None

    def _settle(self, job: _Job, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            job.fail("RENDER_FAILED", f"{job.config.template_name}: the render worker answered nonsense")
        elif reply[0] == "ok" and len(reply) == 3 and isinstance(reply[1], str) and isinstance(reply[2], float):
            self.costs.observe(job.config, reply[2])
            if not job.future.done():
                job.future.set_result(reply[1])
        elif reply[0] == "error" and len(reply) == 3 and isinstance(reply[1], str) and isinstance(reply[2], str):
            job.fail(reply[1], reply[2])
        elif reply[0] == "again":
            self._requeue([job])
        else:
            job.fail("RENDER_FAILED", f"{job.config.template_name}: the render worker answered nonsense")

    async def _boot(self, w: _Worker, loop: asyncio.AbstractEventLoop) -> bool:
        """Wait for a new worker's "ready" (its start does not count against a render's deadline)."""
        ready = w.wait(loop)
        try:
            await asyncio.wait_for(ready, BOOT_TIMEOUT_S)
            ok = w.conn.recv_bytes(16) == b"ready"
        except (asyncio.TimeoutError, EOFError, OSError):
            ok = False
        if ok:
            self.boot_failures = 0
        else:
            self.boot_failures += 1
            log.warning("a render worker did not start (%d in a row); replacing it", self.boot_failures)
            self._kill(w)
        w.booted = ok
        return ok

    def _died(self, w: _Worker, job: _Job) -> None:
        w.proc.join(1.0)
        code = w.proc.exitcode
        self._kill(w)
        name = job.config.template_name
        if code == -signal.SIGXCPU:
            self._slow_until[job.config.id] = time.monotonic() + SLOW_MEMORY_S
            job.fail("RENDER_TIMEOUT", f"{name}: the render used its CPU limit; stopped")
        else:
            job.fail("RENDER_FAILED", f"{name}: the render worker died (exit code {code})")

    def _kill(self, w: _Worker) -> None:
        """SIGKILL and reap ``w`` (it is replaced when released)."""
        w.unwatch()
        if w.proc.is_alive():
            self.kills += 1
            w.proc.kill()
        w.proc.join(1.0)
        w.conn.close()

    def _release(self, w: _Worker, answered: bool = False) -> None:
        if w not in self._all:  # the pool was closed meanwhile
            return
        # A worker that answered its whole batch is not asked whether it lives (a waitpid per
        # batch): if it died since, the next batch finds its pipe closed and replaces it then.
        if w.retiring or w.conn.closed or (not answered and not w.alive):
            self._kill(w)
            self._all.discard(w)
            if self._draining:
                return
            if not w.booted and self.boot_failures:
                self._respawn_later()  # it did not start: the next one may not either
                if self._idle and (self._queue or self._slow_queue):
                    self._pump()  # the workers there are meanwhile
            else:
                self._replace()
            return
        self._ready(w)

    def _ready(self, w: _Worker) -> None:
        """``w`` idle, and given what waits."""
        self._idle.append(w)
        if self._queue or self._slow_queue:
            self._pump()

    def _replace(self) -> None:
        """A new worker in place of one that is gone, idle and given what waits."""
        if not self.started or self._draining:
            return
        try:
            w = self._spawn()
        except OSError as e:  # no process to be had (fork refused): again later
            self.boot_failures += 1
            log.warning("cannot start a render worker (%d in a row): %s", self.boot_failures, e)
            self._respawn_later()
            return
        self._ready(w)

    def _respawn_later(self) -> None:
        """:meth:`_replace` after a wait that doubles with each worker in a row that did not start."""
        delay = min(BOOT_BACKOFF_MAX_S, BOOT_BACKOFF_S * 2 ** max(0, self.boot_failures - 1))
        epoch = self._epoch

        def fire() -> None:
            if epoch == self._epoch:
                self._replace()

        asyncio.get_running_loop().call_later(delay, fire)


class IsolatedJinja2:
    """The ``jinja2`` generator as the service uses it: every render goes through the pool."""

    name = "jinja2"
    deterministic = Jinja2Generator.deterministic  # the result cache treats it as jinja2 itself
    version = Jinja2Generator.version

    def __init__(self, pool: RenderPool):
        self.pool = pool

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> Any:
        return self.pool.render(config, context)

    def render_seconds(self, config: LoadedConfig) -> float | None:
        """What a render of this config version costs in a worker (not the round trip to it)."""
        return self.pool.costs.get(config)
