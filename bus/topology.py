"""The topology, declared once: streams, durable consumers, delivery policy.

Everything here is derived from :class:`bus.settings.BusSettings` and the event
catalogue, and :func:`provision` makes a server match it, idempotently: run
it on every start, or once with ``chora nats provision``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Sequence

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from bus.settings import BusSettings
from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CANCEL_REQUESTED,
    CATALOGUE,
    COMPENSATION_REQUESTED,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
    DEADLINE_REQUESTED,
    EFFECTS_COMPENSATED,
    GENERATION_REQUESTED,
    ORIGIN_KINDS,
    STANDALONE,
)

log = logging.getLogger("chora.bus")

LIMITS_TTL_S = 180.0  # a rate-limit window is one minute; its counter is gone three minutes after
GATEWAY_TTL_S = 24 * 3600.0  # the gateway's request records and Idempotency-Key answers

CALLBACK_REQUESTS = "notifier-callback-requests"
CALLBACK_OUTCOMES = "notifier-callbacks"
# The notifier's callback delivery policy (services/notifier/callbacks.py, CALLBACK_POLICY):
# 6 attempts + 120 deliveries put off (open circuit, request not recorded yet), 64 in flight.
CALLBACK_MAX_DELIVER = 126
CALLBACK_MAX_IN_FLIGHT = 64
# The assembler's deadline timers (docs/saga.md): each is held, unacknowledged, until it is
# due (a nak with that delay), so up to this many runs may wait for their deadline at once.
DEADLINES_MAX_PENDING = 100_000
DEADLINES_MAX_DELIVER = 1000
RUN_KINDS = tuple(k for k in ORIGIN_KINDS if k != STANDALONE)  # the assembler's: artifact, batch


@dataclass(frozen=True)
class ConsumerSpec:
    durable: str
    event_types: tuple[str, ...] | None  # None: every event in the stream
    ack_wait_s: float
    max_deliver: int
    backoff_s: tuple[float, ...] = (1.0, 5.0, 30.0)
    max_ack_pending: int = 1024
    # Where a new consumer starts: "all" (the stream's history), "new" (what is stored from
    # now on) or a datetime (what was stored since then). None: "new", and an existing
    # consumer keeps the start it was created with. See provision() for an existing one.
    start: str | datetime | None = "all"
    # For the types whose subjects carry the kind of run (contracts.catalogue.ORIGIN_KINDS): only
    # these kinds are delivered (None: all of them)
    origin_kinds: tuple[str, ...] | None = None
    # For the request types whose subjects say whether they carry a callback_url
    # (contracts.catalogue.CALLBACK): only those that do are delivered.
    callbacks_only: bool = False

    def nak_delay(self, num_delivered: int) -> float:
        return self.backoff_s[min(max(num_delivered, 1), len(self.backoff_s)) - 1]


@dataclass(frozen=True)
class Topology:
    prefix: str
    events_stream: str
    dlq_stream: str
    max_age_s: float
    max_bytes: int
    duplicate_window_s: float
    replicas: int = 1
    consumers: dict[str, ConsumerSpec] = field(default_factory=dict)
    state_bucket: str = ""  # KV: the assembler's artifact and batch state
    content_bucket: str = ""  # Object Store: content too large to travel inline
    cache_bucket: str = ""  # KV: the generator's result cache (per-entry TTL, bucket max age as the ceiling)
    limits_bucket: str = ""  # KV: the generator's rate-limit counters, one per model per minute
    gateway_bucket: str = ""  # KV: the gateway's request records and Idempotency-Key answers (TTL 24 h)

    @classmethod
    def from_settings(cls, s: BusSettings, replicas: int | None = None) -> "Topology":
        def spec(name: str, types: tuple[str, ...] | None) -> ConsumerSpec:
            return ConsumerSpec(
                name, types, s.ack_wait_s, s.max_deliver, max_ack_pending=max(1024, s.max_concurrency * 2)
            )

        base = s.stream_name.removesuffix("_EVENTS")
        return cls(
            prefix=s.prefix,
            state_bucket=f"{base}_STATE",
            content_bucket=f"{base}_CONTENT",
            cache_bucket=f"{base}_CACHE",
            limits_bucket=f"{base}_LIMITS",
            gateway_bucket=f"{base}_GATEWAY",
            events_stream=s.stream_name,
            dlq_stream=s.dlq_stream_name,
            max_age_s=s.stream_max_age_s,
            max_bytes=s.stream_max_bytes,
            duplicate_window_s=s.duplicate_window_s,
            replicas=replicas or s.replicas,
            consumers={
                "generator": spec("generator", (GENERATION_REQUESTED,)),
                "validator": spec("validator", (CONTENT_GENERATED,)),
                # the outcomes of its own runs' parts and items only: standalone requests' outcomes
                # are never sent to it (their subjects end with "standalone")
                "assembler": replace(
                    spec("assembler", (ARTIFACT_REQUESTED, BATCH_REQUESTED, CONTENT_GENERATED, CONTENT_VALIDATED)),
                    origin_kinds=RUN_KINDS,
                ),
                # cancels (and the compensations' facts) on a consumer of their own: they never wait
                # behind a run's backlog of outcomes
                "assembler-cancels": spec("assembler-cancels", (CANCEL_REQUESTED, EFFECTS_COMPENSATED)),
                # deadline timers: each held (nak with a delay) until due, see docs/saga.md
                "assembler-deadlines": replace(
                    spec("assembler-deadlines", (DEADLINE_REQUESTED,)),
                    max_deliver=DEADLINES_MAX_DELIVER,
                    max_ack_pending=DEADLINES_MAX_PENDING,
                ),
                # the generator undoes its effects (cache entries, stored content) for a run that ended badly
                "generator-compensations": spec("generator-compensations", (COMPENSATION_REQUESTED,)),
                # the assembler reads its own completions back: "finished" means "stored in the stream"
                "assembler-completions": spec("assembler-completions", (BATCH_COMPLETED, ARTIFACT_ASSEMBLED)),
                # the notifier's per-request callbacks (services/notifier/callbacks.py): the requests,
                # to record their callback_url, and the outcomes, to deliver them; from new events on
                # (only the requests that carry a callback_url: their subjects end with "callback")
                CALLBACK_REQUESTS: replace(
                    spec(CALLBACK_REQUESTS, (GENERATION_REQUESTED, ARTIFACT_REQUESTED, BATCH_REQUESTED)),
                    start=None,
                    callbacks_only=True,
                ),
                # (a part or an item never has a callback of its own: standalone outcomes only)
                CALLBACK_OUTCOMES: ConsumerSpec(
                    CALLBACK_OUTCOMES,
                    (CONTENT_GENERATED, ARTIFACT_ASSEMBLED, BATCH_COMPLETED),
                    s.ack_wait_s,
                    CALLBACK_MAX_DELIVER,
                    max_ack_pending=CALLBACK_MAX_IN_FLIGHT,
                    start=None,
                    origin_kinds=(STANDALONE,),
                ),
            },
        )

    # ------------------------------------------------------------------ subjects
    def subject(self, event_type: str) -> str:
        """Every event of the type (``<prefix>.content_generated.*`` for one split by origin)."""
        return CATALOGUE[event_type].subject(self.prefix)

    def filter_subjects(self, c: ConsumerSpec) -> list[str]:
        """What consumer ``c`` reads: its types' subjects, narrowed to its origin kinds (or to
        the requests that carry a callback)."""
        assert c.event_types is not None
        subjects: list[str] = []
        for t in c.event_types:
            spec = CATALOGUE[t]
            if spec.by_origin and c.origin_kinds is not None:
                subjects += [spec.subject_of(self.prefix, k) for k in c.origin_kinds]
            elif spec.by_callback and c.callbacks_only:
                subjects.append(spec.callback_subject(self.prefix))
            else:
                subjects += spec.subjects(self.prefix)
        return subjects

    def dlq_subject(self, consumer: str) -> str:
        return f"{self.prefix}.dlq.{consumer}"

    def max_deliveries_advisory(self) -> str:
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.events_stream}.*"

    # ------------------------------------------------------------------ configs
    def stream_configs(self) -> list[StreamConfig]:
        common: dict[str, Any] = dict(
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            num_replicas=self.replicas,
            max_age=self.max_age_s,
        )
        return [
            StreamConfig(
                name=self.events_stream,
                description="chora events: requests and facts",
                subjects=[subject for s in CATALOGUE.values() for subject in s.subjects(self.prefix)],
                max_bytes=self.max_bytes,
                duplicate_window=self.duplicate_window_s,
                **common,
            ),
            StreamConfig(
                name=self.dlq_stream,
                description="chora dead letters: original message + reason headers",
                subjects=[f"{self.prefix}.dlq.>", self.max_deliveries_advisory()],
                duplicate_window=self.duplicate_window_s,
                **common,
            ),
        ]

    def consumer_spec(
        self, durable: str, event_types: tuple[str, ...] | None, template: str = "generator", **overrides
    ) -> ConsumerSpec:
        """A consumer declared at run time (e.g. one per webhook subscription), with the delivery
        policy of ``template`` unless overridden."""
        base = self.consumers[template]
        return ConsumerSpec(
            durable,
            event_types,
            overrides.get("ack_wait_s", base.ack_wait_s),
            overrides.get("max_deliver", base.max_deliver),
            tuple(overrides.get("backoff_s", base.backoff_s)),
            overrides.get("max_ack_pending", base.max_ack_pending),
            overrides.get("start", base.start),
            overrides.get("origin_kinds"),
        )

    def consumer_config(self, c: ConsumerSpec) -> ConsumerConfig:
        start = "new" if c.start is None else c.start
        cfg = ConsumerConfig(
            durable_name=c.durable,
            deliver_policy=DeliverPolicy.ALL if start == "all" else DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=c.ack_wait_s,
            max_deliver=c.max_deliver,
            max_ack_pending=c.max_ack_pending,
            max_waiting=512,
        )
        if isinstance(start, datetime):
            cfg.deliver_policy, cfg.opt_start_time = DeliverPolicy.BY_START_TIME, start
        if c.event_types is not None:
            subjects = self.filter_subjects(c)
            if len(subjects) == 1:
                cfg.filter_subject = subjects[0]
            else:
                cfg.filter_subjects = subjects
        return cfg


async def allow_msg_ttl(js: JetStreamContext, bucket: str) -> bool:
    """Let the KV bucket's stream take per-message TTLs (nats-server 2.11+), as nats-py creates
    buckets; one created otherwise (an older client, `nats kv add`) is updated, once. The
    state bucket needs it for the batch results TTL (services/assembler/retention.py). True
    when it was updated."""
    info = await js.stream_info(f"KV_{bucket}")
    if info.config.allow_msg_ttl:
        return False
    info.config.allow_msg_ttl = True
    await js.update_stream(info.config)
    log.info("KV bucket %s now allows per-message TTLs", bucket)
    return True


class ProvisionError(RuntimeError):
    """The server's topology cannot be made to match the declared one; the message says why."""


def _start(cfg: ConsumerConfig) -> str:
    """Where ``cfg`` starts, as the config file says it (the server answers policies as plain str)."""
    if cfg.deliver_policy == DeliverPolicy.BY_START_TIME and cfg.opt_start_time is not None:
        return cfg.opt_start_time.astimezone(timezone.utc).isoformat()
    return DeliverPolicy(cfg.deliver_policy).value


async def _add_consumer(js: JetStreamContext, stream: str, spec: ConsumerSpec, cfg: ConsumerConfig) -> None:
    """Create the consumer, or update an existing one, which keeps its position: JetStream
    cannot change where a consumer starts, so a ``start`` other than the one it was created
    with is an error, unless ``spec.start`` is None (whatever it was created with)."""
    try:
        current = (await js.consumer_info(stream, spec.durable)).config
    except NotFoundError:
        current = None
    if current is not None and _start(current) != _start(cfg):
        if spec.start is not None:
            raise ProvisionError(
                f"consumer {spec.durable} already exists and started from {_start(current)}; "
                f"start: {_start(cfg)} applies only to a new consumer (JetStream cannot move an existing "
                f"one, which keeps its position). Set start back to {_start(current)} (or remove it) to go "
                "on from where it is, or use a new name: a new consumer starts from start."
            )
        cfg.deliver_policy, cfg.opt_start_time = current.deliver_policy, current.opt_start_time
    await js.add_consumer(stream, cfg)


_STREAM_FIELDS = ("subjects", "max_age", "max_bytes", "duplicate_window", "description", "num_replicas")


def _stream_differs(current: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether a stream needs an update. A limit left unset (None) in ``wanted`` is what the
    server reports as -1 (unlimited): the two are the same, not a change."""
    for f in _STREAM_FIELDS:
        have, want = getattr(current, f), getattr(wanted, f)
        if want is None and have in (None, -1):
            continue
        if have != want:
            return True
    return False


async def provision(
    js: JetStreamContext,
    topo: Topology,
    consumers: list[str] | None = None,
    extra: Sequence[ConsumerSpec] = (),
    retire: Sequence[str] = (),
) -> None:
    """Create or update the streams, buckets and the named durable consumers (all by default)
    but those in ``retire``, which are deleted where they exist (a feature turned off: a
    durable nobody reads would only pile up pending messages)."""
    for cfg in topo.stream_configs():
        assert cfg.name is not None, "stream_configs() names every stream"
        try:
            info = await js.stream_info(cfg.name)
        except NotFoundError:
            await js.add_stream(cfg)
            log.info("created stream %s", cfg.name)
            continue
        if _stream_differs(info.config, cfg):
            await js.update_stream(cfg)
            log.info("updated stream %s", cfg.name)
    # The cache's entries expire by a TTL each; limit markers make an expiry visible to watchers.
    # Its reads are direct gets (one per request on the hot path), served by any replica.
    buckets = (
        (topo.state_bucket, "chora assembler state", topo.max_age_s, None, False),
        (topo.cache_bucket, "chora result cache", topo.max_age_s, 60.0, True),
        (topo.limits_bucket, "chora rate-limit counters (one per model per minute)", LIMITS_TTL_S, None, False),
        (topo.gateway_bucket, "chora gateway requests and idempotency keys", GATEWAY_TTL_S, None, False),
    )
    for bucket, description, ttl, marker_ttl, direct in buckets:
        if not bucket:
            continue
        try:
            await js.key_value(bucket)
            await allow_msg_ttl(js, bucket)
        except (NotFoundError, BucketNotFoundError):
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    storage=StorageType.FILE,
                    replicas=topo.replicas,
                    ttl=ttl,
                    description=description,
                    limit_marker_ttl=marker_ttl,
                    direct=direct,
                )
            )
    try:
        await js.object_store(topo.content_bucket)
    except (NotFoundError, BucketNotFoundError):
        await js.create_object_store(
            topo.content_bucket,
            ObjectStoreConfig(
                storage=StorageType.FILE, replicas=topo.replicas, ttl=topo.max_age_s, description="chora large content"
            ),
        )
    names = consumers if consumers is not None else list(topo.consumers)
    specs = [topo.consumers[n] for n in names if n not in retire]
    for spec in [*specs, *extra]:
        await _add_consumer(js, topo.events_stream, spec, topo.consumer_config(spec))
    for durable in retire:
        try:
            await js.delete_consumer(topo.events_stream, durable)
            log.info("deleted consumer %s (nothing reads it)", durable)
        except NotFoundError:
            pass
        except Exception as e:  # e.g. a user that may create consumers but not delete them
            log.warning("consumer %s is not read any more but could not be deleted: %s", durable, e)


def unread_consumers(callback_allow: Sequence[str]) -> list[str]:
    """The topology's durables that no service reads with this callback allow-list: the
    callbacks' outcomes while callbacks are off (no entry that is not blank; the notifier then
    refuses a callback when it reads the request, and reads no outcome at all)."""
    return [] if any(a.strip() for a in callback_allow) else [CALLBACK_OUTCOMES]


__all__ = ["ConsumerSpec", "ProvisionError", "Topology", "provision", "CONTENT_GENERATED", "GENERATION_REQUESTED"]
