"""bus.progress.ConsumerProgress against a real nats-server: whether a durable consumer has
settled everything up to a stream sequence, from its ack floor or because it is caught up."""

from __future__ import annotations

import asyncio

from bus.progress import ConsumerProgress
from bus.topology import Topology, provision


async def test_handled_through_follows_the_ack_floor_and_a_caught_up_consumer(settings, nc):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo, consumers=[])
    subject = f"{settings.prefix}.generation.requested"
    other = f"{settings.prefix}.content_generated.standalone"
    sub = await js.pull_subscribe(subject, durable="reqs", stream=topo.events_stream)
    progress = ConsumerProgress(js, topo.events_stream, "reqs", min_interval=0)

    first = await js.publish(subject, b"{}")
    outcome = await js.publish(other, b"{}")  # another subject: not this consumer's
    # the request is not settled yet: nothing up to the outcome is known to be handled
    assert await progress.handled_through(outcome.seq) is False
    (msg,) = await sub.fetch(1, timeout=5)
    assert await progress.handled_through(outcome.seq) is False  # delivered, not acknowledged
    await msg.ack_sync()
    assert await progress.handled_through(outcome.seq) is True  # caught up: everything so far settled
    assert progress.floor >= first.seq

    # a request after the outcome, delivered and nak'ed: the floor stays below it
    later = await js.publish(subject, b"{}")
    last_outcome = await js.publish(other, b"{}")
    (msg,) = await sub.fetch(1, timeout=5)
    await msg.nak()  # to be redelivered: not settled
    assert await progress.handled_through(later.seq) is False
    assert await progress.handled_through(last_outcome.seq) is False
    assert await progress.handled_through(outcome.seq) is True  # known already: no question asked

    (msg,) = await sub.fetch(1, timeout=5)
    assert msg.metadata.num_delivered == 2
    await msg.ack_sync()  # the late request settled: caught up again
    assert await progress.handled_through(last_outcome.seq) is True


class _CountingJs:
    """The JetStream context, counting the consumer-info requests made through it."""

    def __init__(self, js):
        self.js, self.asked = js, 0

    async def consumer_info(self, stream, durable):
        self.asked += 1
        return await self.js.consumer_info(stream, durable)


async def test_one_caught_up_answer_covers_every_caller_waiting_for_it(settings, nc):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo, consumers=[])
    await js.pull_subscribe(f"{settings.prefix}.generation.requested", durable="reqs", stream=topo.events_stream)
    counting = _CountingJs(js)
    progress = ConsumerProgress(counting, topo.events_stream, "reqs", min_interval=0)  # type: ignore[arg-type]
    other = f"{settings.prefix}.content_generated.standalone"
    seqs = [(await js.publish(other, b"{}")).seq for _ in range(5)]  # outcomes; the consumer has no request
    # five callers at once: the first one's request goes out before the others ask; the next
    # request, made while the four wait, answers all four (one request per caller before)
    answers = await asyncio.gather(*(progress.handled_through(s) for s in seqs))
    assert answers == [True] * 5
    assert counting.asked == 2
    assert progress.floor >= max(seqs)
