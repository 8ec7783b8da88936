"""The result cache's key and policy (services/generator/cache.py), and a config's ``cache:``."""

from __future__ import annotations

import re

import time

import pytest
from prometheus_client import CollectorRegistry

from composition.configs import ConfigError, ConfigStore, parse_cache
from services.generator.cache import CacheMetrics, ResultCache, cache_key, canonical_json, generator_version
from services.generator.generators.jinja import Jinja2Generator
from services.generator.generators.simple import DemonstrationGenerator, TemplateFillGenerator
from tests.conftest import write

BASE = dict(
    config_id="greet",
    generator="jinja2",
    version="1",
    config_hash="c" * 64,
    template_hash="t" * 64,
    context={"name": "Ada", "tags": ["a", "b"], "nested": {"x": 1, "y": [1, 2]}},
)
KV_KEY = re.compile(r"[-/_=.A-Za-z0-9]+")


def test_canonical_json_sorts_keys_at_every_depth_and_has_no_whitespace():
    assert canonical_json({"b": 1, "a": {"d": [1, {"f": 2, "e": 3}], "c": None}}) == (
        b'{"a":{"c":null,"d":[1,{"e":3,"f":2}]},"b":1}'
    )


def test_the_key_does_not_depend_on_the_order_of_the_context():
    shuffled = {"nested": {"y": [1, 2], "x": 1}, "tags": ["a", "b"], "name": "Ada"}
    assert cache_key(**BASE) == cache_key(**{**BASE, "context": shuffled})


@pytest.mark.parametrize(
    "field, value",
    [
        ("generator", "template_fill"),
        ("version", "2"),
        ("config_hash", "d" * 64),
        ("template_hash", "u" * 64),
        ("template_hash", None),
        ("context", {"name": "Ada", "tags": ["b", "a"], "nested": {"x": 1, "y": [1, 2]}}),  # list order counts
        ("context", {"name": "Ada ", "tags": ["a", "b"], "nested": {"x": 1, "y": [1, 2]}}),
        ("context", {"name": "Ada", "tags": ["a", "b"], "nested": {"x": 1, "y": [1, 2]}, "extra": None}),
    ],
)
def test_any_changed_input_changes_the_key(field, value):
    assert cache_key(**BASE) != cache_key(**{**BASE, field: value})


def test_the_key_starts_with_the_config_id_and_is_a_valid_kv_key():
    key = cache_key(**BASE)
    config_id, digest = key.split(".")
    assert config_id == "greet" and re.fullmatch(r"[0-9a-f]{64}", digest)
    assert KV_KEY.fullmatch(key)
    # another config with the same everything else: another key, under its own prefix
    assert cache_key(**{**BASE, "config_id": "other"}).startswith("other.")


@pytest.mark.parametrize(
    "given, parsed",
    [
        (None, None),
        ("on", "on"),
        (True, "on"),
        ("off", "off"),
        (False, "off"),
        (90, 90),
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("2d", 172800),
        ("45", 45),
    ],
)
def test_cache_settings_are_read_as_seconds_on_or_off(given, parsed):
    assert parse_cache(given) == parsed


@pytest.mark.parametrize("bad", [0, -5, "0s", "1w", "soon", 1.5, "", [60]])
def test_a_bad_cache_setting_is_refused(bad):
    with pytest.raises(ValueError, match="TTL"):
        parse_cache(bad)


def test_a_config_with_a_bad_cache_setting_is_config_invalid(tmp_path):
    write(tmp_path / "c.json", {"id": "c", "generator": "jinja2", "template": "x", "cache": "forever"})
    with pytest.raises(ConfigError) as e:
        ConfigStore(tmp_path).get("c")
    assert e.value.code == "CONFIG_INVALID" and "cache" in e.value.message


def test_the_config_hash_changes_with_any_field_of_the_config(tmp_path):
    store = ConfigStore(tmp_path)
    path = write(tmp_path / "c.json", {"id": "c", "generator": "jinja2", "template": "x"})
    first = store.get("c").config_hash
    path.write_text('{"generator": "jinja2", "template": "x", "id": "c"}')  # same config, other text
    store.invalidate()
    assert store.get("c").config_hash == first
    write(path, {"id": "c", "generator": "jinja2", "template": "x", "context": {"a": 1}})
    store.invalidate()
    assert store.get("c").config_hash not in (None, first)


class _Nondeterministic:
    name = "llm"

    def render(self, config, context):  # pragma: no cover - never called here
        return ""


def _cache(min_render_s: float = 0.001) -> ResultCache:
    return ResultCache(
        backend=None, metrics=CacheMetrics(CollectorRegistry()), default_ttl_s=600, min_render_s=min_render_s
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "setting, generator, ttl",
    [
        (None, Jinja2Generator(), None),  # deterministic, but its renders not measured yet (below)
        (None, TemplateFillGenerator(), None),
        (None, DemonstrationGenerator(), None),
        (None, _Nondeterministic(), None),  # no `deterministic = True`: off by default
        ("on", _Nondeterministic(), 600.0),
        (120, _Nondeterministic(), 120.0),
        ("off", Jinja2Generator(), None),
        (30, Jinja2Generator(), 30.0),
    ],
)
def test_the_ttl_follows_the_config_then_the_generators_determinism(tmp_path, setting, generator, ttl):
    doc = {"id": "c", "generator": "jinja2", "template": "x"}
    if setting is not None:
        doc["cache"] = setting
    write(tmp_path / "c.json", doc)
    assert _cache().ttl_for(ConfigStore(tmp_path).get("c"), generator) == ttl


class _Costed:
    """A deterministic generator that reports what its renders cost (as the render pool does)."""

    name, deterministic = "costed", True

    def __init__(self, seconds: float | None):
        self.seconds = seconds

    def render_seconds(self, config):
        return self.seconds

    def render(self, config, context):  # pragma: no cover - never called here
        return ""


@pytest.mark.parametrize(
    "cost, min_render_s, ttl",
    [
        (None, 0.001, None),  # not measured yet: rendered, not looked up
        (0.00005, 0.001, None),  # a 50 us render: the lookup would cost more than it saves
        (0.002, 0.001, 600.0),  # a 2 ms render: worth a lookup
        (None, 0, 600.0),  # CHORA_CACHE_MIN_RENDER_MS=0: cached from the first request
    ],
)
def test_by_default_a_deterministic_config_is_cached_when_its_renders_cost_enough(tmp_path, cost, min_render_s, ttl):
    write(tmp_path / "c.json", {"id": "c", "generator": "jinja2", "template": "x"})
    assert _cache(min_render_s).ttl_for(ConfigStore(tmp_path).get("c"), _Costed(cost)) == ttl


async def test_the_cache_times_the_renders_of_a_generator_that_does_not_report_them(tmp_path):
    write(tmp_path / "c.json", {"id": "c", "generator": "jinja2", "template": "x"})
    write(tmp_path / "d.json", {"id": "d", "generator": "jinja2", "template": "y"})
    store, cache, gen = ConfigStore(tmp_path), _cache(min_render_s=0.002), Jinja2Generator()

    async def cheap() -> str:
        return "cheap"

    async def slow() -> str:
        time.sleep(0.005)  # a render that keeps the CPU busy (a blocking call on purpose)
        return "slow"

    c, d = store.get("c"), store.get("d")
    assert await cache.fetch(c, gen, {}, cheap) == ("cheap", False)  # no backend: never looked up
    assert await cache.fetch(d, gen, {}, slow) == ("slow", False)
    assert cache.render_cost(c, gen) < 0.002 and cache.ttl_for(c, gen) is None
    assert cache.render_cost(d, gen) >= 0.005 and cache.ttl_for(d, gen) == 600.0  # from now on, looked up


def test_every_builtin_generator_has_a_version():
    assert generator_version(Jinja2Generator()).startswith("1+jinja2.")
    assert generator_version(TemplateFillGenerator()) == "1"
    assert generator_version(_Nondeterministic()) == "0"  # none declared


@pytest.mark.parametrize(
    "claims, generator, claimed",
    [
        ("auto", Jinja2Generator(), False),  # a local render: cheaper than the KV write of a claim
        ("auto", _Nondeterministic(), True),  # an upstream call: worth a claim
        ("always", Jinja2Generator(), True),
        ("never", _Nondeterministic(), False),
    ],
)
def test_misses_claim_their_key_across_instances_by_the_generators_kind(claims, generator, claimed):
    cache = ResultCache(backend=None, metrics=CacheMetrics(CollectorRegistry()), claims=claims)  # type: ignore[arg-type]
    assert cache.claims_for(generator) is claimed


async def test_a_context_no_canonical_json_can_say_is_rendered_and_not_cached(tmp_path):
    # YAML allows non-string keys; the canonical form (sorted string keys) does not
    write(tmp_path / "c.yaml", "id: c\ngenerator: jinja2\ntemplate: x\ncontext: {a: {1: one}}\n")
    config = ConfigStore(tmp_path).get("c")
    cache = _cache(min_render_s=0)  # every deterministic render cached; no backend: any use of it would fail

    async def render() -> str:
        return "rendered"

    assert await cache.fetch(config, Jinja2Generator(), dict(config.defaults), render) == ("rendered", False)
