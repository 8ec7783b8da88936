"""bus/state.py against a real server: compare-and-set, and items() seeing every entry just written."""

from __future__ import annotations

from bus.state import StateStore
from bus.topology import Topology, provision


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
