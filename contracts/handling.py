"""The handler API: what a handler is given and what it can say besides events. No nats.

A handler is a plain async function of (event, :class:`Delivery`, deps) that
returns the events to publish (``[]`` for none)::

    async def on_generation_requested(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]

Besides events it can raise :class:`Retry` (transient: nak, try again after a
delay) or :class:`Reject` (permanent: dead letter). A service registers its
handlers in a table, event type -> handler (:data:`EventHandlers`), and
:func:`route` binds the table to the service's one dependencies object: the
consumer loop (:mod:`bus.consumer`) calls the result with each event and its
delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, Sequence, TypeVar

import msgspec

from contracts.envelope import CloudEvent

T = TypeVar("T")
D = TypeVar("D")


class Retry(Exception):
    """Transient failure: try again later (after ``delay`` seconds, else the backoff)."""

    def __init__(self, message: str, delay: float | None = None):
        super().__init__(message)
        self.delay = delay


class Reject(Exception):
    """Permanent failure: this message can never be handled. Goes to the dead letters.

    ``events`` (e.g. a notification_failed) are published before the dead letter is stored.
    """

    def __init__(self, code: str, message: str, events: Sequence[CloudEvent] = ()):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.events = list(events)


def expect(event: CloudEvent, event_type: str, struct: type[T], who: str) -> T:
    """The data of ``event`` as ``struct``, for a handler of one event type; otherwise
    :class:`Reject` with UNEXPECTED_TYPE (another type) or INVALID_DATA (data not of that shape)."""
    if event.type != event_type:
        raise Reject("UNEXPECTED_TYPE", f"the {who} handles {event_type}, not {event.type!r}")
    data = event.data
    if type(data) is struct:
        return data
    try:
        return msgspec.convert(data, struct)
    except (msgspec.ValidationError, TypeError) as e:
        raise Reject("INVALID_DATA", f"data is not a {event_type}: {e}") from None


@dataclass(frozen=True)
class Delivery:
    """What a handler may know of the delivery it is handling."""

    attempt: int  # 1 for the first delivery
    max_attempts: int
    consumer: str
    stream_seq: int

    @property
    def last(self) -> bool:
        return self.attempt >= self.max_attempts

    @classmethod
    def first(cls, consumer: str = "", max_attempts: int = 1) -> "Delivery":
        """A first delivery, for a handler called outside the consumer loop (tools, tests)."""
        return cls(attempt=1, max_attempts=max_attempts, consumer=consumer, stream_seq=0)


#: A handler of one service: (event, delivery, the service's dependencies) -> events to publish.
Handler = Callable[[CloudEvent, Delivery, D], Awaitable[Sequence[CloudEvent]]]
#: What the consumer loop calls: a service's handlers bound to its dependencies (see :func:`route`).
Bound = Callable[[CloudEvent, Delivery], Awaitable[Sequence[CloudEvent]]]
#: A service's handlers by event type; the key :data:`ANY` takes every type without its own entry.
EventHandlers = Mapping[str, Handler[D]]

ANY = "*"


def route(handlers: EventHandlers[D], deps: D, who: str) -> Bound:
    """Bind ``handlers`` to ``deps``: each event goes to the handler of its type (else the
    :data:`ANY` one); an event of a type the table does not list is rejected (UNEXPECTED_TYPE)."""

    async def handle(event: CloudEvent, delivery: Delivery) -> Sequence[CloudEvent]:
        handler = handlers.get(event.type) or handlers.get(ANY)
        if handler is None:
            raise Reject("UNEXPECTED_TYPE", f"the {who} does not handle {event.type!r}")
        return await handler(event, delivery, deps)

    return handle
