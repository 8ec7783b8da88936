"""bench.markers, the figures docs/saga.md gives for the generator's follow of the stopped-run
markers: against a real nats-server, the full read takes every marker and the refresh only the
ones written after the sequence the full read ended at."""

from __future__ import annotations

from bench import markers


async def test_the_markers_bench_reads_every_marker_then_only_the_new_ones():
    res = await markers.main(markers=500, new=7)
    assert res["full"]["read"] == 500
    assert res["refresh"]["read"] == 7  # read after the 500: a refresh reading them all again would fail here
    for run in ("full", "refresh"):
        assert res[run]["seconds"] > 0 and res[run]["cpu_s"] >= 0 and res[run]["longest_loop_stall_ms"] >= 0
