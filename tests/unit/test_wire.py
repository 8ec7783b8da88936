"""The bus's own reading and writing of the NATS wire (bus.wire, bus.publisher), without a
server: what it writes is what nats-py would write, what it reads is what nats-py reads."""

from __future__ import annotations

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.publisher import fast_path, header_block
from bus.wire import delivery_facts, direct_deliveries, parse_headers
from contracts.catalogue import GENERATION_REQUESTED
from contracts.envelope import decode, encode_binary, new_event
from contracts.events import GenerationRequested


def test_the_header_block_reads_back_as_the_same_event():
    ev = new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="c", context={"a": 1}), source="s t")
    headers, body = encode_binary(ev)
    block = header_block(headers)
    assert block.startswith(b"NATS/1.0\r\n") and block.endswith(b"\r\n\r\n")
    status, parsed = parse_headers(block)
    assert status is None and parsed == headers
    assert decode(parsed, body) == ev


def test_newlines_never_reach_the_wire_from_a_header_value():
    block = header_block({"ce-time": "2026-01-01T00:00:00Z\r\nce-type: forged", "Nats-Msg-Id": "x\ny"})
    assert block == b"NATS/1.0\r\nce-time: 2026-01-01T00:00:00Zce-type: forged\r\nNats-Msg-Id: xy\r\n\r\n"
    assert parse_headers(block)[1] == {"ce-time": "2026-01-01T00:00:00Zce-type: forged", "Nats-Msg-Id": "xy"}


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.EVENTS.generator.3.42.7.1700000000000000000.15",
        "$JS.ACK.hub.ACCHASH.EVENTS.generator.3.42.7.1700000000000000000.15.rand",
    ],
)
def test_delivery_facts_are_what_nats_py_reads_from_the_ack_subject(reply):
    md = Msg(Client(), reply=reply).metadata
    assert delivery_facts(reply) == (md.num_delivered, md.sequence.stream, md.num_pending) == (3, 42, 15)


@pytest.mark.parametrize("reply", ["", "_INBOX.abc", "$JS.ACK.S.c.1", "$JS.NAK.S.c.1.2.3.4.5"])
def test_delivery_facts_refuse_what_is_not_an_ack_subject(reply):
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        delivery_facts(reply)


def test_the_installed_nats_py_has_what_the_fast_paths_use():
    # an upgrade of nats-py that drops one of these internals would quietly slow every service
    # down to the fallback: this test says so first
    assert fast_path(nats.NATS())
    assert not fast_path(object())
    assert direct_deliveries(nats.NATS()) == {}
