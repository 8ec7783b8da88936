"""Rule sets: a config's ``validation`` list compiled once, cached per config version."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Iterable

from pydantic import ValidationError

from composition.configs import validation_problems
from contracts.events import ValidationIssue
from services.validator.rules.common import MAX_DETAIL_CHARS
from services.validator.rules.text import RULE_TYPES, Content, rule_adapter


class RulesError(ValueError):
    """The ``validation`` list of a config cannot be used. ``problems`` has one
    readable line per problem, each naming the rule index."""

    code = "INVALID_RULES"

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems
        self.message = "; ".join(problems)


def parse_rule(raw: Any, index: int) -> tuple[Any | None, list[str]]:
    """(the rule, []) or (None, problems naming ``validation[index]``)."""
    head = f"validation[{index}]"
    if not isinstance(raw, dict):
        return None, [f"{head}: a rule must be a mapping with a 'type', got {type(raw).__name__}"]
    kind = raw.get("type")
    known = ", ".join(RULE_TYPES)
    if kind is None:
        return None, [f"{head}: the rule has no 'type' (one of: {known})"]
    if kind not in RULE_TYPES:
        return None, [f"{head}: unknown rule type {kind!r} (known: {known})"]
    try:
        return rule_adapter.validate_python(raw), []
    except ValidationError as e:
        return None, [f"{head} ({kind}): {p}" for p in validation_problems(e, drop=kind)]


class RuleSet:
    """The compiled rules of one config version."""

    __slots__ = ("rules",)

    def __init__(self, rules: Iterable[Any] = ()):
        self.rules = tuple(rules)

    def __len__(self) -> int:
        return len(self.rules)

    def apply(self, text: str) -> list[ValidationIssue]:
        """One issue per failed rule, in rule order."""
        if not self.rules:
            return []
        c = Content(text)
        issues = []
        for rule in self.rules:
            try:
                detail = rule.check(c)
            except Exception as e:  # a bug, or content too deep to analyse: report it, never loop on it
                detail = f"the rule could not be applied: {type(e).__name__}: {e}"
            if detail is None:
                continue
            if len(detail) > MAX_DETAIL_CHARS:
                detail = detail[: MAX_DETAIL_CHARS - 1] + "…"
            msg = f"{rule.message} ({detail})" if rule.message else detail
            issues.append(ValidationIssue(rule=rule.type, severity=rule.severity, message=msg))
        return issues


def compile_rules(raw: Any) -> RuleSet:
    """The rule set of a ``validation`` list; raises :class:`RulesError` listing every problem."""
    if raw is None:
        return RuleSet()
    if not isinstance(raw, list):
        raise RulesError([f"validation: must be a list of rules, got {type(raw).__name__}"])
    rules, problems = [], []
    for i, item in enumerate(raw):
        rule, errs = parse_rule(item, i)
        if rule is not None:
            rules.append(rule)
        problems.extend(errs)
    if problems:
        raise RulesError(problems)
    return RuleSet(rules)


def is_valid(issues: Iterable[ValidationIssue]) -> bool:
    """False when any issue has severity error; warnings never invalidate."""
    return not any(i.severity == "error" for i in issues)


class RuleCache:
    """Compiled rule sets (or the :class:`RulesError`) per ``(config id, config hash)``,
    the ``maxsize`` most recently used."""

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self._cache: OrderedDict[tuple[str, str], RuleSet | RulesError] = OrderedDict()
        self.compiled = 0  # how many times a rule set was built (for tests and info)
        self._hashes: dict[str, tuple[Any, str]] = {}
        # per config id: (config object, what was derived from it), kept while the store
        # keeps the same object (the file unchanged): see services/validator/reports.check_config
        self.derived: dict[str, tuple[Any, Any]] = {}

    def get(self, config_id: str, config_hash: str, raw: Any) -> RuleSet:
        key = (config_id, config_hash)
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = compile_rules(raw)
            except RulesError as e:
                hit = e
            self.compiled += 1
            self._cache[key] = hit
            if len(self._cache) > self.maxsize:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if isinstance(hit, RulesError):
            raise hit
        return hit

    def for_config(self, config: Any) -> tuple[str, RuleSet | RulesError]:
        """(config hash, its rule set or the error) for a loaded config. The hash is
        remembered per config object, which the config store keeps while the file
        is unchanged, so a cached lookup costs two dict hits."""
        known = self._hashes.get(config.id)
        if known is not None and known[0] is config:
            chash = known[1]
        else:
            chash = config_hash(config)
            self._hashes[config.id] = (config, chash)
            if len(self._hashes) > self.maxsize:
                self._hashes.pop(next(iter(self._hashes)))
        try:
            return chash, self.get(config.id, chash, config.spec.validation)
        except RulesError as e:
            return chash, e

    def __len__(self) -> int:
        return len(self._cache)


# --------------------------------------------------------------------------- config versions


def _canonical(doc: Any) -> bytes:
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    except TypeError:  # keys of mixed types deep in a context: keep their order instead
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def config_hash(config: Any) -> str:
    """``sha256:<hex>`` of a loaded config: its parsed content (so reformatting the
    file or editing a comment is not a new version) and its template source."""
    h = hashlib.sha256(_canonical(config.spec.model_dump(mode="json")))
    h.update(b"\0")
    h.update((config.template_hash or "").encode())
    return "sha256:" + h.hexdigest()


def error_hash(code: str, message: str) -> str:
    """The version of a config that cannot be loaded: its error (the same broken file
    gives the same error; a different breakage gives a different one)."""
    return "sha256:" + hashlib.sha256(f"{code}\0{message}".encode("utf-8", "surrogatepass")).hexdigest()
