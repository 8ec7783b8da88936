"""bus/state.py against a real server: compare-and-set, items() seeing every entry just written, and a
follow made again from the last sequence it saw."""

from __future__ import annotations

from bus.state import StateStore
from bus.topology import Topology, provision
from tests.conftest import wait_for


async def test_compare_and_set_and_items_right_after_writes(nc, settings):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    st = StateStore(js, topo.state_bucket)
    rev = await st.create("k", b"1")
    assert rev and await st.create("k", b"again") is None
    assert await st.update("k", b"2", rev) and await st.update("k", b"3", rev) is None
    assert (await st.get("k"))[0] == b"2"
    assert await st.items("nothing") == {}
    for r in range(100):  # items() right after the puts: no entry may be missing
        for i in range(5):
            await st.put(f"b{r}.item.{i}", str(i).encode())
        assert len(await st.items(f"b{r}")) == 5, f"round {r}"
    await st.put("b0.item.0", b"new")
    assert (await st.items("b0"))["b0.item.0"] == b"new"


async def test_a_follow_made_again_after_a_sequence_reads_only_what_changed_since(nc, settings):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    st = StateStore(js, topo.state_bucket)
    for key in ("cancelled.batch.b1", "cancelled.batch.b2", "batch.b1"):
        await st.put(key, b"m")

    first: list[tuple[str, bool, int]] = []
    sub = await st.follow("cancelled.*.*", lambda k, p, s: first.append((k, p, s)))
    await wait_for(lambda: len(first) == 2, 5, "the two markers there, read by a first follow")
    await sub.unsubscribe()
    assert [(k, p) for k, p, _ in first] == [("cancelled.batch.b1", True), ("cancelled.batch.b2", True)]
    seen = max(s for _, _, s in first)

    await st.put("cancelled.artifact.r3", b"m")
    await (await st.kv()).delete("cancelled.batch.b1")
    again: list[tuple[str, bool, int]] = []
    sub = await st.follow("cancelled.*.*", lambda k, p, s: again.append((k, p, s)), after_seq=seen)
    await wait_for(lambda: len(again) >= 2, 5, "what changed after the first follow")
    await st.put("cancelled.artifact.r4", b"m")  # and what changes later, in order after them
    await wait_for(lambda: len(again) >= 3, 5, "a marker written after the follow was made")
    await sub.unsubscribe()
    # b2 (and b1's put) came before `seen`: not read again; ordered delivery puts them first if they were
    assert [(k, p) for k, p, _ in again] == [
        ("cancelled.artifact.r3", True),
        ("cancelled.batch.b1", False),
        ("cancelled.artifact.r4", True),
    ]
    assert all(s > seen for _, _, s in again)

    # a sequence the stream never reached (the bucket was made anew): every current marker
    fresh: list[tuple[str, bool, int]] = []
    sub = await st.follow("cancelled.*.*", lambda k, p, s: fresh.append((k, p, s)), after_seq=10**9)
    await wait_for(lambda: len(fresh) == 4, 5, "every marker's last state")
    await sub.unsubscribe()
    assert sorted((k, p) for k, p, _ in fresh) == [
        ("cancelled.artifact.r3", True),
        ("cancelled.artifact.r4", True),
        ("cancelled.batch.b1", False),  # its delete is its last state
        ("cancelled.batch.b2", True),
    ]


async def test_a_follow_after_a_sequence_reads_everything_when_the_stream_info_is_refused(nc, settings):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    seq = await StateStore(js, topo.state_bucket).put("cancelled.batch.b1", b"m")  # its stream sequence

    class NoStreamInfo:  # a client allowed to follow but not to read the stream's info
        def __getattr__(self, name):
            return getattr(js, name)

        async def stream_info(self, name, *args, **kwargs):
            raise PermissionError(f"Permissions Violation for Publish to $JS.API.STREAM.INFO.{name}")

    seen: list[str] = []
    st = StateStore(NoStreamInfo(), topo.state_bucket)  # type: ignore[arg-type]
    sub = await st.follow("cancelled.*.*", lambda k, p, s: seen.append(k), after_seq=seq)
    await wait_for(lambda: seen == ["cancelled.batch.b1"], 5, "every current marker, read as without after_seq")
    await sub.unsubscribe()
