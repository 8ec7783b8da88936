"""Request context in the JSONL: by default its values stay out, a digest goes in.

A request's ``context`` can hold anything its sender knows (names, addresses,
customer data). The sink writes, instead of a ``context`` mapping::

    context_sha256  "sha256:<hex>" of the context's canonical JSON: keys sorted at every
                    depth, no whitespace, UTF-8 with non-ASCII characters as themselves
                    (as ``json.dumps(ctx, sort_keys=True, separators=(",", ":"),
                    ensure_ascii=False)`` writes it, floats aside), of the values as sent
    context_keys    its top-level key names, sorted

This applies to every ``context`` at the top of an event's data
(``generation.requested``, ``artifact.requested``, ``batch.requested``) and to
the ``context`` of each inline item of a list ``items`` (the items of a
``batch.requested``; items by reference, ``items_ref``, are only a name and
stay as they are).

A config opts in to keeping the values with ``telemetry: {keep_context: true}``
(content configs and artifact configs, :class:`composition.configs.TelemetrySpec`):

- a mapping naming ``artifact_id`` follows that artifact config, one naming
  ``content_config_id`` that content config (a generation request, a batch item);
- a batch's shared ``context`` is kept only when it has inline items and every
  one of their configs opts in (by reference, the items are not known here);
- anything else (no config named, an unknown or broken config) does not opt in.

The key-name redaction (:func:`services.telemetry.lines.redact`) runs after
this, so kept values are still redacted by key name; the digest is computed
from the values as sent.

A note on the digest: it lets a reader match a line to a known context (the
sender can recompute it) and tell equal contexts apart from different ones,
without the values. Like any plain hash it does not hide a value that can be
guessed: whoever suspects ``{"name": "Ada"}`` can hash it and compare.

:func:`private_data` is pure; :class:`ConfigOptIn` answers "does this config
opt in?" from the configs directory and is what the telemetry service uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Literal

import msgspec

from composition.artifacts import ArtifactStore
from composition.configs import ConfigStore

log = logging.getLogger("chora.telemetry")

ConfigKind = Literal["content", "artifact"]
KeepContext = Callable[[ConfigKind, str], bool]
"""(kind of config, config id) -> True when that config opts in to keeping context values."""


def keep_none(kind: ConfigKind, config_id: str) -> bool:
    """The default policy: no config opts in."""
    return False


def canonical_json(value: Any) -> bytes:
    """The canonical JSON of ``value``: keys sorted at every depth, no whitespace, UTF-8."""
    try:
        return msgspec.json.encode(value, order="sorted")
    except (TypeError, msgspec.EncodeError):  # not a JSON document (a mapping with non-string keys...)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr).encode(
            "utf-8", "surrogatepass"
        )


def context_digest(context: Any) -> dict[str, Any]:
    """What is written instead of a context: ``context_sha256`` and ``context_keys``."""
    keys = sorted(str(k) for k in context) if isinstance(context, dict) else []
    return {"context_sha256": "sha256:" + hashlib.sha256(canonical_json(context)).hexdigest(), "context_keys": keys}


def _named(mapping: dict[str, Any]) -> tuple[ConfigKind, str] | None:
    """The config a request (or an item) names, if any."""
    artifact = mapping.get("artifact_id")
    if isinstance(artifact, str):
        return ("artifact", artifact)
    content = mapping.get("content_config_id")
    if isinstance(content, str):
        return ("content", content)
    return None


def _without_context(mapping: dict[str, Any]) -> dict[str, Any]:
    """``mapping`` with its ``context`` replaced, in place of it, by the digest."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if k == "context":
            out.update(context_digest(v))
        else:
            out[k] = v
    return out


def private_data(data: dict[str, Any], keep_context: KeepContext = keep_none) -> dict[str, Any]:
    """The payload ``data`` (builtins, as the line takes it) with every context whose config
    does not opt in replaced by its digest (see the module docstring). ``data`` is not changed;
    a payload without a context is returned as it is."""
    answers: dict[tuple[ConfigKind, str], bool] = {}

    def keeps(named: tuple[ConfigKind, str] | None) -> bool:
        if named is None:
            return False
        got = answers.get(named)
        if got is None:
            try:
                got = answers[named] = bool(keep_context(*named))
            except Exception as e:  # a policy that fails keeps nothing
                log.warning("telemetry: could not tell whether %s config %r keeps context: %s", *named, e)
                got = answers[named] = False
        return got

    items = data.get("items")
    inline: list[dict[str, Any]] = (
        items if isinstance(items, list) and items and all(isinstance(i, dict) for i in items) else []
    )
    out = data
    if any("context" in i for i in inline):
        out = {**data, "items": [i if "context" not in i or keeps(_named(i)) else _without_context(i) for i in inline]}
    if "context" in data:
        keep = all(keeps(_named(i)) for i in inline) if inline else keeps(_named(data))
        if not keep:
            out = _without_context(out)
    return out


class ConfigOptIn:
    """A :data:`KeepContext` read from the configs directory: content configs through a
    :class:`~composition.configs.ConfigStore`, artifact configs through an
    :class:`~composition.artifacts.ArtifactStore`. A config that cannot be loaded (unknown id,
    broken file) does not opt in. An answer is remembered for ``ttl_s`` seconds (an edited
    config counts after at most that), at most ``max_entries`` of them."""

    def __init__(
        self,
        configs_dir: Path | str,
        *,
        ttl_s: float = 5.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.configs = ConfigStore(configs_dir)
        self.artifacts = ArtifactStore(configs_dir)
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._answers: dict[tuple[str, str], tuple[float, bool]] = {}

    def __call__(self, kind: ConfigKind, config_id: str) -> bool:
        now = self.clock()
        key = (kind, config_id)
        got = self._answers.get(key)
        if got is not None and got[0] > now:
            return got[1]
        keep = self._load(kind, config_id)
        if len(self._answers) >= self.max_entries:
            self._answers.clear()
        self._answers[key] = (now + self.ttl_s, keep)
        return keep

    def _load(self, kind: ConfigKind, config_id: str) -> bool:
        try:
            if kind == "artifact":
                return self.artifacts.get(config_id).spec.telemetry.keep_context
            return self.configs.get(config_id).spec.telemetry.keep_context
        except Exception as e:  # unknown, broken, unreadable: not opted in
            log.debug("telemetry: %s config %r not opted in to keeping context: %s", kind, config_id, e)
            return False
