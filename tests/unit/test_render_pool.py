"""The render pool: real worker processes, bounded by the OS, replaced when they pass a limit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
from jinja2.ext import Extension
from jinja2.sandbox import SandboxedEnvironment

from composition.configs import ConfigStore, GenerationError
from contracts.handling import Retry
from services.generator.generators.limits import TokenLimit
from services.generator.generators.sandbox import _Sandbox
from services.generator.isolation import BOOT_FAILURES_MAX, RenderLimits, RenderPool
from services.generator.render_worker import worker_main
from tests.conftest import wait_for, write

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc: Linux")

NESTED = "{% for a in items %}{% for b in items %}{% endfor %}{% endfor %}"
ITEMS = list(range(20_000))


@pytest.fixture
def store(tmp_path) -> ConfigStore:
    d = tmp_path / "configs"
    write(d / "hello.json", {"id": "hello", "generator": "jinja2", "template": "Hello {{ name }}!"})
    write(d / "nested.json", {"id": "nested", "generator": "jinja2", "template": NESTED})
    write(d / "big.json", {"id": "big", "generator": "jinja2", "template": "{{ 'a'.ljust(10**9) }}"})
    return ConfigStore(d)


@pytest.fixture
def pool(request):
    limits = getattr(request, "param", None) or RenderLimits(workers=2, timeout_s=0.5, memory_mb=256)
    p = RenderPool(limits)
    p.start()
    yield p
    p.close()


async def code_of(aw) -> str:
    with pytest.raises(GenerationError) as e:
        await aw
    return e.value.code


async def test_a_render_past_its_deadline_is_killed_and_the_worker_replaced(pool, store):
    assert await code_of(pool.render(store.get("nested"), {"items": ITEMS})) == "RENDER_TIMEOUT"
    assert pool.kills == 1
    assert len(pool._all) == pool.size and all(w.alive for w in pool._all)
    for i in range(2 * pool.size):  # every worker serves again
        assert await pool.render(store.get("hello"), {"name": str(i)}) == f"Hello {i}!"


async def test_a_render_past_its_memory_limit_is_render_memory_and_the_pool_goes_on(pool, store):
    assert await code_of(pool.render(store.get("big"), {})) == "RENDER_MEMORY"
    assert await pool.render(store.get("hello"), {"name": "after"}) == "Hello after!"
    assert len(pool._all) == pool.size


async def test_a_worker_killed_from_outside_is_render_failed_and_replaced(pool, store):
    # every worker started (a worker that dies before it is ready only costs a retry elsewhere)
    await asyncio.gather(*(pool.render(store.get("hello"), {"name": "x"}) for _ in range(pool.size)))
    assert all(w.booted for w in pool._all)
    slow = asyncio.create_task(pool.render(store.get("nested"), {"items": ITEMS}))
    await wait_for(lambda: len(pool._idle) == pool.size - 1, 10, "the slow render handed to a worker")
    (busy,) = pool._all - set(pool._idle)
    os.kill(busy.proc.pid, signal.SIGKILL)
    assert await code_of(slow) == "RENDER_FAILED"
    assert await pool.render(store.get("hello"), {"name": "x"}) == "Hello x!"
    assert busy not in pool._all and len(pool._all) == pool.size


async def test_slow_configs_leave_a_worker_for_the_others(pool, store):
    assert await code_of(pool.render(store.get("nested"), {"items": ITEMS})) == "RENDER_TIMEOUT"
    assert pool.is_slow("nested")
    finished: list[str] = []

    async def run(config_id: str, context: dict) -> None:
        try:
            await pool.render(store.get(config_id), context)
        except GenerationError:
            pass
        finished.append(config_id)

    tasks = [asyncio.create_task(run("nested", {"items": ITEMS})) for _ in range(3)]
    tasks.append(asyncio.create_task(run("hello", {"name": "x"})))
    await asyncio.gather(*tasks)
    # the slow ones hold at most workers - 1 (here 1) workers: hello never waits for them
    assert finished[0] == "hello", finished


async def test_drain_hands_back_what_waits_and_lets_the_running_render_finish(pool, store):
    running = [asyncio.create_task(pool.render(store.get("nested"), {"items": ITEMS})) for _ in range(pool.size)]
    await wait_for(lambda: not pool._idle, 10, "every worker busy")
    queued = asyncio.create_task(pool.render(store.get("hello"), {"name": "x"}))
    await wait_for(lambda: len(pool._queue) == 1, 10, "the hello request queued")
    pool.drain()
    with pytest.raises(Retry):
        await queued
    for t in running:
        assert await code_of(t) == "RENDER_TIMEOUT"
    with pytest.raises(Retry):
        await pool.render(store.get("hello"), {"name": "late"})


async def test_many_requests_in_flight_each_get_their_own_answer(pool, store):
    """Batches: one worker takes many queued jobs; answers go to the right requests."""
    names = [f"n{i}" for i in range(300)]
    out = await asyncio.gather(*(pool.render(store.get("hello"), {"name": n}) for n in names))
    assert out == [f"Hello {n}!" for n in names]


async def test_a_slow_job_in_a_batch_does_not_fail_the_others(pool, store):
    jobs = [pool.render(store.get("hello"), {"name": f"a{i}"}) for i in range(20)]
    jobs.append(pool.render(store.get("nested"), {"items": ITEMS}))
    jobs += [pool.render(store.get("hello"), {"name": f"b{i}"}) for i in range(20)]
    out = await asyncio.gather(*jobs, return_exceptions=True)
    codes = [o.code for o in out if isinstance(o, GenerationError)]
    assert codes == ["RENDER_TIMEOUT"]
    assert sum(isinstance(o, str) for o in out) == 40


def test_the_sandbox_overrides_only_documented_hooks():
    """No private jinja2 API: what the sandbox and the extension redefine are documented hooks."""

    def redefined(cls: type, base: type) -> set[str]:
        return {k for k in vars(cls) if hasattr(base, k) and not (k.startswith("__") and k != "__init__")}

    documented = {"__init__", "intercepted_binops", "call_binop"}
    ours = redefined(_Sandbox, SandboxedEnvironment)
    assert ours <= documented, ours - documented
    ours_ext = redefined(TokenLimit, Extension)
    assert ours_ext <= {"filter_stream"}, ours_ext


async def test_cheap_renders_wake_one_worker_and_costly_ones_are_shared(pool, store, monkeypatch):
    hello = store.get("hello")
    await asyncio.gather(*(pool.render(hello, {"name": "warm"}) for _ in range(pool.size)))  # every worker up
    batches: list[int] = []
    run_batch = pool._run_batch

    async def counted(w, jobs, slow):
        batches.append(len(jobs))
        await run_batch(w, jobs, slow)

    monkeypatch.setattr(pool, "_run_batch", counted)

    async def burst(n: int) -> None:  # n renders asked in one turn of the loop, every worker idle
        await wait_for(lambda: len(pool._idle) == pool.size, 10, "every worker idle")
        batches.clear()
        got = await asyncio.gather(*(pool.render(hello, {"name": str(i)}) for i in range(n)))
        assert got == [f"Hello {i}!" for i in range(n)]

    for _ in range(20):
        pool.costs.observe(hello, 50e-6)  # 50 us a render: 8 of them are not worth a second wake-up
    await burst(8)
    assert batches == [8]
    for _ in range(20):
        pool.costs.observe(hello, 0.01)  # 10 ms a render: shared between the idle workers
    await burst(8)
    assert sorted(batches) == [4, 4]


async def test_a_costly_render_is_not_batched_behind_many_cheap_ones(pool, store, monkeypatch):
    hello, nested = store.get("hello"), store.get("nested")
    await asyncio.gather(*(pool.render(hello, {"name": "warm"}) for _ in range(pool.size)))
    for _ in range(20):
        pool.costs.observe(hello, 50e-6)
        pool.costs.observe(nested, 0.01)
    batches: list[list[str]] = []
    run_batch = pool._run_batch

    async def counted(w, jobs, slow):
        batches.append([job.config.id for job in jobs])
        await run_batch(w, jobs, slow)

    monkeypatch.setattr(pool, "_run_batch", counted)
    await wait_for(lambda: len(pool._idle) == pool.size, 10, "every worker idle")
    jobs = [pool.render(hello, {"name": str(i)}) for i in range(3)] + [
        pool.render(nested, {"items": [1]}) for _ in range(5)
    ]
    await asyncio.gather(*jobs)
    # the three cheap ones and the first costly one (past 1 ms) in one batch, the rest shared
    assert batches == [["hello"] * 3 + ["nested"], ["nested"] * 4]


class FlakyWorker:
    """A worker process that exits at once while ``flag`` exists, and works as usual otherwise
    (as when the machine has no memory or processes to give a new worker, and later has)."""

    def __init__(self, flag: str):
        self.flag = flag

    def __call__(self, conn, limits) -> None:
        if os.path.exists(self.flag):
            os._exit(3)
        worker_main(conn, limits)


async def test_workers_that_cannot_start_hand_requests_back_instead_of_restarting_without_end(store, tmp_path):
    flag = tmp_path / "broken"
    flag.touch()
    pool = RenderPool(RenderLimits(workers=2, timeout_s=2), target=FlakyWorker(str(flag)))
    pool.start()
    try:
        # Before, each worker that did not start was replaced at once, and the request waited
        # for good while the pool forked a process after another.
        with pytest.raises(Retry, match="cannot start"):
            await asyncio.wait_for(pool.render(store.get("hello"), {"name": "a"}), 20)
        assert pool.boot_failures == BOOT_FAILURES_MAX
        assert pool.spawned <= pool.size + BOOT_FAILURES_MAX
        with pytest.raises(Retry, match="cannot start"):  # each replacement after a wait, then handed back
            await asyncio.wait_for(pool.render(store.get("hello"), {"name": "b"}), 20)
        assert pool.spawned <= pool.size + BOOT_FAILURES_MAX + 1
        flag.unlink()  # the machine has room again: the next worker starts and serves
        assert await asyncio.wait_for(pool.render(store.get("hello"), {"name": "c"}), 20) == "Hello c!"
        assert pool.boot_failures == 0
    finally:
        pool.close()


async def test_detach_on_the_loop_leaves_close_nothing_of_the_loop_to_touch_from_its_thread(store):
    pool = RenderPool(RenderLimits(workers=2, timeout_s=2))
    pool.start()
    try:
        await asyncio.gather(*(pool.render(store.get("hello"), {"name": str(i)}) for i in range(8)))
        assert any(w.loop is not None for w in pool._all)  # the pipes of workers that served are watched
        pool.detach()  # as the generator does, on the loop
        assert all(w.loop is None for w in pool._all)
        with pytest.raises(Retry):
            await pool.render(store.get("hello"), {"name": "late"})
    finally:
        workers = list(pool._all)
        await asyncio.to_thread(pool.close)  # in a thread, as the generator does
    assert workers and not any(w.proc.is_alive() for w in workers)
