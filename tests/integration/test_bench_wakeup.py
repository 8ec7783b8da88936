"""bench.wakeup, the machine's wake-up figures `make bench` prints under its table: it runs
its round trips against a real echo process and a real nats-server, and reads the woken
process's CPU from the scheduler."""

from __future__ import annotations

import socket

from bench import compare, wakeup


def test_the_wakeup_bench_measures_pipe_and_nats_round_trips_and_the_woken_process_cpu():
    res = wakeup.main(rounds=40, gap_ms=1.0)
    assert res["rounds"] == 40 and res["idle_gap_ms"] == 1.0
    for kind in ("pipe_round_trip", "nats_ping_round_trip"):
        for run in ("back_to_back", "after_idle"):
            r = res[kind][run]
            assert 0 < r["p50_ms"] <= r["p99_ms"] < 1000, (kind, run, r)
    # the echo process ran (read a byte, wrote it back) for every round trip
    assert res["pipe_round_trip"]["after_idle"]["child_cpu_us_per_wakeup"] > 0
    line = compare.wake_line(res)
    assert "PING to nats-server" in line and "us of CPU per wake-up" in line


def test_the_nats_ping_probe_answers_the_servers_own_ping_that_arrives_with_our_pong():
    # nats-server sends a PING of its own about 2 s after CONNECT; when it came in the same read
    # as our PONG, the probe waited for a PONG that never came and `make bench` died at its end
    ours, server = socket.socketpair()
    with ours, server:
        ours.settimeout(5)
        server.sendall(b"PONG\r\nPING\r\n")
        wakeup._pong(ours)
        assert server.recv(64) == b"PONG\r\n"
        server.sendall(b"PING\r\nPO")  # its PING first, our PONG split over two reads
        server.sendall(b"NG\r\n")
        wakeup._pong(ours)
        assert server.recv(64) == b"PONG\r\n"
