"""Config reports: one ``chora.config_validated`` per content config version.

A config version is what :func:`~services.validator.rules.config_hash` names (its
parsed content and its template source); the version of a config that cannot be
loaded at all is its error (:func:`~services.validator.rules.error_hash` of code
and message). Every version gets one report:

- status ``success``, with the result: ``rule_count``, ``rule_types`` (in order)
  and ``warnings`` (what is worth a look but does not make the config invalid:
  :func:`config_warnings`);
- status ``error``, with ``error`` (``INVALID_RULES``, or why the config cannot
  be loaded).

When a version is reported
--------------------------
- When the validator starts, and again every ``rescan_interval_s`` while it
  runs, it checks every config in the configs directory (:func:`scan`): a
  version nobody generates with is still a new version.
- When a content_generated names a version not reported yet (the file changed
  under a running service, or the config is unknown): with its verdict
  (:func:`claim_once`, see :mod:`services.validator.handlers`).

Once per version
----------------
The report's key in the KV state store is
``configcheck.<config id>.<first 16 hex of the config hash>`` (:func:`report_key`);
its value names who claimed it (an event id, or ``scan:<instance>``). The
report's event id is derived from the config id and the hash only
(:func:`config_report_id`), so every copy anyone ever publishes for one version
has the same id and JetStream drops a second copy inside its duplicate window.

- In traffic the claim comes first (``create``, a compare-and-set), the report
  goes out with the verdict, and the message is acked after both are stored; a
  redelivery of the claiming event reports again (see the handlers).
- A scan has no message to be redelivered, so it publishes first and claims
  after: it reads the key, publishes the report when the key is absent, then
  creates the key. A scan that dies between the two publishes again next time,
  under the same event id. Two instances scanning at once may both publish:
  the same id, dropped by JetStream as a duplicate.

Each instance also remembers (:class:`Claims`, bounded) which versions are
claimed and by whom, so a version costs one KV round trip per instance, not
one per message.

A version is reported again only when its key is gone from the KV bucket,
whose TTL is the events stream's max age (7 days by default): by then the
earlier report has left the stream as well, so the next scan (by any instance
that does not remember the claim itself) puts one report of every current
version back into the stream.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

import msgspec

from composition.configs import ConfigError, ConfigStore, LoadedConfig, valid_config_id
from contracts.catalogue import CONFIG_VALIDATED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ConfigValidated, ErrorInfo
from contracts.handling import Reject, Retry
from services.validator.rules import RuleCache, RulesError, RuleSet, error_hash

log = logging.getLogger("chora.validator")

KEY_PREFIX = "configcheck"
MAX_MESSAGE_CHARS = 2000
_REPORT_NAMESPACE = uuid.UUID("2b7c0f4e-8a51-4d7e-b3a6-5f0e9c1d2a47")
_encode = msgspec.json.encode

Publish = Callable[[Sequence[CloudEvent]], Awaitable[Any]]


class StateLike(Protocol):
    """What the reports need of :class:`bus.state.StateStore`."""

    async def create(self, key: str, value: bytes) -> int | None: ...

    async def get(self, key: str) -> tuple[bytes, int] | None: ...


def cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"


def report_key(config_id: str, config_hash: str) -> str:
    """The KV key that records the report of one config version."""
    safe = config_id if valid_config_id(config_id) else "id-" + error_hash("ID", config_id)[7:23]
    return f"{KEY_PREFIX}.{safe}.{config_hash.split(':', 1)[-1][:16]}"


def config_report_id(config_id: str, config_hash: str) -> str:
    """The event id of the config_validated for one config version: the same for
    every instance, every redelivery and every scan."""
    return str(uuid.uuid5(_REPORT_NAMESPACE, f"{config_id}/{config_hash}/{CONFIG_VALIDATED}"))


# --------------------------------------------------------------------------- checking a config


def config_warnings(config: LoadedConfig, rules: RuleSet) -> list[str]:
    """What a usable config is told: true, but not a reason to refuse it."""
    if not len(rules):
        return ["no validation rules: every generated content is judged valid"]
    out = []
    fmt = config.output_format
    for i, rule in enumerate(rules.rules):
        if rule.type == "json_schema" and fmt != "json":
            out.append(f"validation[{i}] (json_schema): output_format is {fmt!r}, so content that is not JSON fails")
    if all(rule.severity == "warning" for rule in rules.rules):
        out.append("every rule has severity warning: no content is ever judged invalid")
    return out


@dataclass(frozen=True, slots=True)
class Checked:
    """One config version, checked: its rules (None when broken) and its report."""

    config_id: str
    config_hash: str
    rules: RuleSet | None
    report: ConfigValidated

    @property
    def key(self) -> str:
        return report_key(self.config_id, self.config_hash)

    def event(self, source: str, cause: CloudEvent | None = None) -> CloudEvent:
        return new_event(
            CONFIG_VALIDATED,
            self.report,
            source=source,
            cause=cause,
            event_id=config_report_id(self.config_id, self.config_hash),
        )


def _broken(config_id: str, chash: str, code: str, message: str) -> Checked:
    err = ErrorInfo(code=code, message=cut(message))
    return Checked(
        config_id,
        chash,
        None,
        ConfigValidated(content_config_id=config_id, status="error", config_hash=chash, error=err),
    )


def check_config(store: ConfigStore, rules: RuleCache, config_id: str) -> Checked:
    """Load ``config_id`` and build its rules and report (all cached per version: a loaded
    config is the same object while its file is unchanged); never raises a ConfigError."""
    try:
        config = store.get(config_id)
    except ConfigError as e:
        return _broken(config_id, error_hash(e.code, e.message), e.code, e.message)
    known = rules.derived.get(config_id)
    if known is not None and known[0] is config:
        return known[1]
    checked = _check(config_id, config, rules)
    rules.derived[config_id] = (config, checked)
    while len(rules.derived) > rules.maxsize:
        rules.derived.pop(next(iter(rules.derived)))
    return checked


def _check(config_id: str, config: Any, rules: RuleCache) -> Checked:
    chash, built = rules.for_config(config)
    if isinstance(built, RulesError):
        return _broken(config_id, chash, built.code, built.message)
    report = ConfigValidated(
        content_config_id=config_id,
        status="success",
        config_hash=chash,
        rule_count=len(built),
        rule_types=[rule.type for rule in built.rules],
        warnings=config_warnings(config, built),
    )
    return Checked(config_id, chash, built, report)


# --------------------------------------------------------------------------- claiming


class Claims:
    """Who claimed which report key, as far as this instance knows (at most ``maxsize``
    keys, the oldest forgotten first: forgetting costs one KV read, never a second report)."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self._owners: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        return self._owners.get(key)

    def set(self, key: str, owner: str) -> None:
        self._owners[key] = owner
        self._owners.move_to_end(key)
        while len(self._owners) > self.maxsize:
            self._owners.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._owners

    def __len__(self) -> int:
        return len(self._owners)


def _owner(raw: bytes) -> str:
    try:
        owner = msgspec.json.decode(raw).get("cause")
    except (msgspec.DecodeError, AttributeError):
        return ""
    return owner if isinstance(owner, str) else ""


async def claim_report(state: StateLike | None, key: str, event_id: str) -> bool:
    """True when the handling of ``event_id`` is the one that reports this config
    version: its ``create`` of the key succeeded, or the key names it already (a
    redelivery). Without a state store every handling may report, and only the
    deterministic event id deduplicates."""
    if state is None:
        return True
    record = _encode({"cause": event_id, "at": time.time()})
    try:
        for _ in range(3):
            if await state.create(key, record) is not None:
                return True
            got = await state.get(key)
            if got is None:  # expired or deleted between the two calls: claim again
                continue
            return _owner(got[0]) == event_id
    except (Retry, Reject):
        raise
    except Exception as e:
        raise Retry(f"state store unavailable while claiming {key}: {type(e).__name__}: {e}") from None
    raise Retry(f"could not claim {key}: it keeps disappearing")


async def claim_once(state: StateLike | None, claims: Claims, key: str, event_id: str) -> bool:
    """:func:`claim_report`, asked of the KV store only the first time this instance
    meets ``key``; later handlings answer from ``claims`` (only the claiming event,
    redelivered, reports again)."""
    owner = claims.get(key)
    if owner is None:
        mine = await claim_report(state, key, event_id)
        owner = event_id if mine else ""
        claims.set(key, owner)
    return owner == event_id


# --------------------------------------------------------------------------- scanning the configs directory


async def scan(
    store: ConfigStore,
    rules: RuleCache,
    state: StateLike | None,
    claims: Claims,
    publish: Publish,
    *,
    source: str,
    scanner: str,
) -> list[Checked]:
    """Report every config version in the configs directory that nobody reported yet
    (see the module docstring); the versions this call published. A failure of the
    KV store or of the publish stops the scan (raised): the next one tries again."""
    published = []
    for config_id in store.list():
        checked = check_config(store, rules, config_id)
        key = checked.key
        if key in claims:
            continue
        if state is not None:
            got = await state.get(key)
            if got is not None:
                claims.set(key, _owner(got[0]))
                continue
        await publish([checked.event(source)])
        if state is not None:
            await state.create(key, _encode({"cause": scanner, "at": time.time()}))  # None: someone beat us to it
        claims.set(key, scanner)
        published.append(checked)
        level = logging.INFO if checked.rules is not None else logging.WARNING
        log.log(level, "content config %r (%s) checked: %s", config_id, checked.config_hash[:19], checked.report.status)
    return published
