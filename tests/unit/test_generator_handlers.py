"""The generator's handler and app: one outcome per request, errors as events."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from contracts.handling import Delivery, Reject, Retry
from services.settings import Settings
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import CloudEvent, decode, encode_binary, new_event
from contracts.events import ContentGenerated, GenerationRequested
from composition.configs import ConfigStore
from services.generator.generators import GeneratorRegistry
from services.generator.handlers import MAX_MESSAGE_CHARS, MAX_OUTPUT_BYTES, Deps, on_generation_requested
from services.generator.service import SOURCE, GeneratorApp, build
from tests.conftest import example_configs, self_contained_examples, write

EXAMPLES = example_configs()


def request(config_id="greet", context=None, *, trace_id="trace-1"):
    data = GenerationRequested(content_config_id=config_id, context={} if context is None else context)
    return new_event(GENERATION_REQUESTED, data, source="urn:test", trace_id=trace_id)


@pytest.fixture
def cdir(tmp_path) -> Path:
    d = tmp_path / "configs"
    write(
        d / "greet.json",
        {"id": "greet", "generator": "jinja2", "template": "Hello {{ name }}!", "context": {"name": "World", "n": 1}},
    )
    write(d / "fill.json", {"id": "fill", "generator": "template_fill", "template": "{{ a.b }}"})
    write(d / "demo.json", {"id": "demo", "generator": "demonstration", "example_output": "fixed"})
    write(d / "nodemo.json", {"id": "nodemo", "generator": "demonstration"})
    write(d / "typo.json", {"id": "typo", "generator": "jinja2", "templte": "x"})
    write(d / "unknown-gen.json", {"id": "unknown-gen", "generator": "nope", "template": "x"})
    write(d / "syntax.json", {"id": "syntax", "generator": "jinja2", "template": "a\n{% if %}"})
    write(d / "unsafe.json", {"id": "unsafe", "generator": "jinja2", "template": "{{ ''.__class__ }}"})
    write(d / "no-template.json", {"id": "no-template", "generator": "jinja2", "template_file": "templates/missing.j2"})
    write(d / "escape.json", {"id": "escape", "generator": "jinja2", "template_file": "../../etc/passwd"})
    write(d / "repeat.json", {"id": "repeat", "generator": "jinja2", "template": "{{ s * n }}"})
    return d


@pytest.fixture
def store(cdir) -> ConfigStore:
    return ConfigStore(cdir)


@pytest.fixture
def registry() -> GeneratorRegistry:
    return GeneratorRegistry()


async def handle_generation_requested(ev, store, registry, source, **kw) -> list[CloudEvent]:
    """The handler as the consumer loop calls it, on a first delivery."""
    return await on_generation_requested(ev, Delivery.first("generator"), Deps(store, registry, source, **kw))


async def handle(ev, store, registry, **kw) -> ContentGenerated:
    out = await handle_generation_requested(ev, store, registry, SOURCE, **kw)
    assert len(out) == 1
    (result,) = out
    assert result.type == CONTENT_GENERATED
    assert result.source == SOURCE
    assert isinstance(result.data, ContentGenerated)
    assert result.data.request_id == ev.id
    return result.data


# --------------------------------------------------------------------------- success


async def test_success_outcome_has_every_field(store, registry):
    ev = request("greet", {"name": "Ada"})
    (out,) = await handle_generation_requested(ev, store, registry, SOURCE)
    d = out.data
    assert d.status == "success" and d.error is None
    assert d.content == "Hello Ada!"
    assert d.content_config_id == "greet"
    assert d.generator_type == "jinja2"
    assert d.content_hash == "sha256:" + hashlib.sha256(b"Hello Ada!").hexdigest()
    assert d.content_length == len("Hello Ada!")
    assert 0 <= d.duration_ms < 10_000
    assert out.traceid == ev.traceid == "trace-1"
    assert out.traceparent.split("-")[1] == ev.traceparent.split("-")[1]


async def test_content_length_counts_characters_and_hash_is_over_utf8(store, registry):
    d = await handle(request("greet", {"name": "Zoë 🙂"}), store, registry)
    assert d.content == "Hello Zoë 🙂!"
    assert d.content_length == len("Hello Zoë 🙂!")
    assert d.content_hash == "sha256:" + hashlib.sha256("Hello Zoë 🙂!".encode()).hexdigest()


async def test_config_context_is_the_default_under_the_request_context(store, registry):
    assert (await handle(request("greet"), store, registry)).content == "Hello World!"
    assert (await handle(request("greet", {"name": "Grace"}), store, registry)).content == "Hello Grace!"
    assert store.get("greet").defaults == {"name": "World", "n": 1}  # defaults untouched


async def test_same_request_twice_gives_the_same_outcome_id(store, registry):
    ev = request("greet")
    (a,) = await handle_generation_requested(ev, store, registry, SOURCE)
    (b,) = await handle_generation_requested(ev, store, registry, SOURCE)
    assert a.id == b.id
    (c,) = await handle_generation_requested(request("greet"), store, registry, SOURCE)
    assert c.id != a.id


async def test_error_outcome_id_is_deterministic_too(store, registry):
    ev = request("missing")
    (a,) = await handle_generation_requested(ev, store, registry, SOURCE)
    (b,) = await handle_generation_requested(ev, store, registry, SOURCE)
    assert a.id == b.id and a.data.status == "error"


async def test_outcome_survives_the_wire(store, registry):
    (out,) = await handle_generation_requested(request("greet", {"name": "wire"}), store, registry, SOURCE)
    headers, body = encode_binary(out)
    back = decode(headers, body)
    assert back.data == out.data
    assert headers["Nats-Msg-Id"] == out.id


async def test_template_fill_and_demonstration_through_the_handler(store, registry):
    d = await handle(request("fill", {"a": {"b": "deep"}}), store, registry)
    assert (d.status, d.content, d.generator_type) == ("success", "deep", "template_fill")
    d = await handle(request("demo"), store, registry)
    assert (d.status, d.content, d.generator_type) == ("success", "fixed", "demonstration")


async def test_edited_config_is_used_on_the_next_request(cdir, store, registry):
    assert (await handle(request("greet"), store, registry)).content == "Hello World!"
    p = write(
        cdir / "greet.json",
        {"id": "greet", "generator": "jinja2", "template": "Bye {{ name }}.", "context": {"name": "World"}},
    )
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert (await handle(request("greet"), store, registry)).content == "Bye World."


# --------------------------------------------------------------------------- errors are events


@pytest.mark.parametrize(
    "config_id, context, code, generator_type",
    [
        ("Bad_Id", {}, "INVALID_CONFIG_ID", None),
        ("../../etc/passwd", {}, "INVALID_CONFIG_ID", None),
        ("missing", {}, "CONFIG_NOT_FOUND", None),
        ("typo", {}, "CONFIG_INVALID", None),
        ("nodemo", {}, "CONFIG_INVALID", "demonstration"),
        ("unknown-gen", {}, "UNKNOWN_GENERATOR", "nope"),
        ("syntax", {}, "TEMPLATE_ERROR", "jinja2"),
        ("unsafe", {}, "TEMPLATE_SECURITY", "jinja2"),
        ("no-template", {}, "TEMPLATE_NOT_FOUND", None),
        ("escape", {}, "PATH_OUTSIDE_CONFIGS", None),
        ("fill", {"a": {}}, "MISSING_VARIABLE", "template_fill"),
        ("repeat", {"s": "x"}, "MISSING_VARIABLE", "jinja2"),
        ("repeat", {"s": "é", "n": 600_000}, "OUTPUT_TOO_LARGE", "jinja2"),  # 600k chars, 1.2 MB
    ],
)
async def test_expected_failures_are_error_events(store, registry, config_id, context, code, generator_type):
    d = await handle(request(config_id, context), store, registry)
    assert d.status == "error"
    assert d.error.code == code
    assert d.error.message
    assert d.content is None and d.content_hash is None and d.content_length is None
    assert d.content_config_id == config_id
    assert d.generator_type == generator_type
    assert d.duration_ms >= 0


@pytest.mark.parametrize("context", [["a", "list"], "a string", 3, None])
async def test_context_that_is_not_an_object(store, registry, context):
    ev = request("greet")
    ev.data.context = context  # only possible in-process: the codec refuses it on the wire
    d = await handle(ev, store, registry)
    assert (d.status, d.error.code) == ("error", "INVALID_CONTEXT")


async def test_output_limit_is_configurable(store, registry):
    d = await handle(request("greet", {"name": "x" * 20}), store, registry, max_output_bytes=10)
    assert (d.status, d.error.code) == ("error", "OUTPUT_TOO_LARGE")
    assert "10" in d.error.message
    ok = await handle(request("greet", {"name": "x"}), store, registry, max_output_bytes=len("Hello x!"))
    assert ok.status == "success"
    assert MAX_OUTPUT_BYTES == 1 << 20


async def test_output_that_would_not_fit_in_an_event_is_an_error(store, registry):
    # 500 control characters become 3000 bytes of JSON escapes.
    d = await handle(request("greet", {"name": "\x01" * 500}), store, registry, max_event_bytes=2000)
    assert (d.status, d.error.code) == ("error", "OUTPUT_TOO_LARGE")
    assert "event" in d.error.message
    ok = await handle(request("greet", {"name": "\x01" * 500}), store, registry, max_event_bytes=1 << 20)
    assert ok.status == "success"


async def test_long_error_messages_are_cut(store, registry):
    class Loud:
        name = "loud"

        def render(self, config, context):
            from composition.configs import GenerationError

            raise GenerationError("TEMPLATE_ERROR", "x" * 100_000)

    registry.register("jinja2", Loud())
    d = await handle(request("greet"), store, registry)
    assert d.error.code == "TEMPLATE_ERROR"
    assert len(d.error.message) == MAX_MESSAGE_CHARS


async def test_a_crashing_generator_is_reported_not_raised(store, registry):
    class Crashy:
        name = "crashy"

        def render(self, config, context):
            raise RuntimeError("boom")

    registry.register("jinja2", Crashy())
    d = await handle(request("greet"), store, registry)
    assert (d.status, d.error.code) == ("error", "GENERATOR_FAILED")
    assert "RuntimeError: boom" in d.error.message


async def test_a_generator_returning_non_text_is_reported(store, registry):
    class Wrong:
        name = "wrong"

        def render(self, config, context):
            return 42

    registry.register("jinja2", Wrong())
    d = await handle(request("greet"), store, registry)
    assert (d.status, d.error.code) == ("error", "GENERATOR_FAILED")


async def test_async_generators_are_awaited(store, registry):
    class Remote:
        name = "remote"

        async def render(self, config, context):
            return f"remote {context['name']}"

    registry.register("jinja2", Remote())
    d = await handle(request("greet"), store, registry)
    assert (d.status, d.content) == ("success", "remote World")


async def test_retry_from_a_generator_propagates(store, registry):
    class Flaky:
        name = "flaky"

        async def render(self, config, context):
            raise Retry("upstream busy", delay=1.0)

    registry.register("jinja2", Flaky())
    with pytest.raises(Retry):
        await handle_generation_requested(request("greet"), store, registry, SOURCE)


# --------------------------------------------------------------------------- not a request at all


async def test_other_event_types_are_rejected(store, registry):
    ev = new_event(
        CONTENT_GENERATED, ContentGenerated(request_id="r", content_config_id="greet", status="success"), source="x"
    )
    with pytest.raises(Reject) as ei:
        await handle_generation_requested(ev, store, registry, SOURCE)
    assert ei.value.code == "UNEXPECTED_TYPE"


async def test_data_as_a_plain_dict_is_accepted(store, registry):
    ev = request("greet")
    ev.data = {"content_config_id": "greet", "context": {"name": "Dict"}}
    d = await handle(ev, store, registry)
    assert d.content == "Hello Dict!"


@pytest.mark.parametrize("data", [None, {"context": {}}, {"content_config_id": 5}, "text"])
async def test_malformed_request_data_is_rejected(store, registry, data):
    ev = request("greet")
    ev.data = data
    with pytest.raises(Reject) as ei:
        await handle_generation_requested(ev, store, registry, SOURCE)
    assert ei.value.code == "INVALID_DATA"


# --------------------------------------------------------------------------- the app


async def test_build_and_run_the_app(tmp_path, cdir):
    app = build(Settings(home=tmp_path / "var", configs_dir=cdir))
    assert isinstance(app, GeneratorApp) and app.name == "generator"
    await app.start()
    (out,) = await app.handle(request("greet", {"name": "App"}), Delivery.first("generator"))
    assert out.data.content == "Hello App!" and out.source == "chora://generator"
    info = app.info()
    assert {"jinja2", "template_fill", "demonstration"} <= set(info["generators"])
    assert "greet" in info["configs"]
    assert info["configs_dir"] == str(cdir.resolve())
    assert set(info["broken_configs"]) == {"typo", "no-template", "escape"}
    json.dumps(info)  # the readiness file needs it as JSON
    await app.close()


async def test_app_uses_the_event_size_limit_from_settings(tmp_path, cdir):
    app = build(Settings(home=tmp_path / "var", configs_dir=cdir, max_event_bytes=2000))
    await app.start()  # the render pool
    try:
        (out,) = await app.handle(request("greet", {"name": "\x01" * 500}), Delivery.first("generator"))
    finally:
        await app.close()
    assert out.data.error.code == "OUTPUT_TOO_LARGE"


# --------------------------------------------------------------------------- the examples


EXPECTED_EXAMPLES = {
    "hello-world": "jinja2",
    "release-notes": "jinja2",
    "api-endpoint-doc": "template_fill",
    "welcome-email": "demonstration",
}


def test_examples_are_there_in_json_and_yaml():
    store = ConfigStore(EXAMPLES)
    assert set(EXPECTED_EXAMPLES) <= set(store.list())
    suffixes = {store.get(i).path.suffix for i in EXPECTED_EXAMPLES}
    assert ".json" in suffixes and suffixes & {".yaml", ".yml"}
    assert store.get("welcome-email").path.suffix in (".yaml", ".yml")
    assert store.get("release-notes").spec.template_file == "templates/release-notes.md.j2"
    for key in ("version", "date", "changes"):
        assert key in store.get("release-notes").defaults
    assert "name" in store.get("hello-world").defaults


def test_only_the_code_generation_example_needs_an_upstream():
    assert set(ConfigStore(EXAMPLES).list()) - set(self_contained_examples()) == {"python-function"}


@pytest.mark.parametrize("config_id", self_contained_examples())
async def test_every_self_contained_example_renders_without_context(config_id, registry):
    store = ConfigStore(EXAMPLES)
    d = await handle(request(config_id), store, registry)
    assert d.status == "success", d.error
    assert d.content.strip()
    assert "{{" not in d.content and "{%" not in d.content
    if config_id in EXPECTED_EXAMPLES:
        assert d.generator_type == EXPECTED_EXAMPLES[config_id]


async def test_example_contents(registry):
    store = ConfigStore(EXAMPLES)
    hello = await handle(request("hello-world", {"name": "Ada"}), store, registry)
    assert "Hello, Ada!" in hello.content and "World" not in hello.content
    no_topics = await handle(request("hello-world", {"topics": []}), store, registry)
    assert "Nothing on the agenda" in no_topics.content
    notes = await handle(
        request("release-notes", {"version": "9.9.9", "changes": [{"kind": "fixed", "text": "a bug"}]}), store, registry
    )
    assert "9.9.9" in notes.content and "## Fixed" in notes.content and "- a bug" in notes.content
    assert "## Added" not in notes.content
    doc = await handle(request("api-endpoint-doc", {"method": "POST", "path": "/v1/x"}), store, registry)
    assert doc.content.startswith("## POST /v1/x")
    mail = await handle(request("welcome-email", {"ignored": True}), store, registry)
    assert mail.content.startswith("Subject: Welcome")
