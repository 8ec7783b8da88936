"""Server-side template injection and resource exhaustion against the jinja2 generator,
and path tricks against the config store, through the generator's real handler.

Every payload goes the most honest way: a content config in a temp configs dir, a
``chora.generation.requested`` event, :func:`on_generation_requested` with a
:class:`ConfigStore` and the registry the service uses, whose jinja2 renders go through
the real render pool (:mod:`services.generator.isolation`: worker processes with an
address-space limit, a CPU limit and a wall-clock deadline; a worker passing them is
killed and replaced). The outcome must be a ``content_generated`` with status ``error``
and an expected code, must not contain the planted secrets, and must come back within
TIME_BUDGET_S. Resource exhaustion may now end in the OS's limits (RENDER_TIMEOUT,
RENDER_MEMORY) instead of an in-template check: what counts is one clear error, quickly,
and a pool that still serves the next payload. A Python ``MemoryError`` text in an
outcome still fails: the worker reports RENDER_MEMORY, it never leaks the exception.
The secret is in the handler's process environment; workers start with an empty one.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path

import msgspec
import pytest

from composition.configs import ConfigStore
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import encode_binary, new_event
from contracts.events import ContentGenerated, GenerationRequested
from services.generator.generators import GeneratorRegistry
from contracts.handling import Delivery
from services.generator.handlers import Deps, on_generation_requested
from services.generator.isolation import IsolatedJinja2, RenderLimits, RenderPool
from services.generator.service import SOURCE

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the render pool needs resource.RLIMIT_AS and /proc (Linux)"
)

TIME_BUDGET_S = 3.0  # "a few seconds": the render deadline is 1 s; a refused payload takes about 10 ms
REFUSED = {"TEMPLATE_SECURITY", "OUTPUT_TOO_LARGE", "TEMPLATE_ERROR", "RENDER_TIMEOUT", "RENDER_MEMORY"}
# A name the sandbox does not define (config, request, __import__, ...) is a missing
# variable under StrictUndefined: refused too, with nothing to leak.
UNDEFINED = {"MISSING_VARIABLE"}

ENV_SECRET_NAME = "CHORA_TEST_TEMPLATE_SECRET"


# --------------------------------------------------------------------------- the runner


class Outcome(msgspec.Struct):
    data: ContentGenerated
    wire: bytes  # the event as it would be published (headers and body), for leak checks
    seconds: float


@pytest.fixture(scope="module")
def pool():
    p = RenderPool(RenderLimits(workers=2, timeout_s=1.0, memory_mb=512))
    p.start()
    yield p
    p.close()


@pytest.fixture(scope="module")
def registry(pool) -> GeneratorRegistry:
    reg = GeneratorRegistry({"jinja2": IsolatedJinja2(pool)})
    reg.load()
    return reg


@pytest.fixture
def secret(monkeypatch) -> str:
    """A secret in the process environment: what a sandbox escape would go for."""
    value = "SECRET-" + secrets.token_hex(12)
    monkeypatch.setenv(ENV_SECRET_NAME, value)
    return value


@pytest.fixture
def generate(registry, secret):
    """Run one request through the handler and the pool; fail on a hang, a raise or a leak."""

    def _generate(
        configs_dir: Path, config_id: str, context: dict | None = None, *, leaks: tuple[str, ...] = ()
    ) -> Outcome:
        event = new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id=config_id, context=context or {}),
            source="urn:test",
        )
        deps = Deps(ConfigStore(configs_dir), registry, SOURCE)
        t0 = time.perf_counter()
        try:
            out = asyncio.run(
                asyncio.wait_for(on_generation_requested(event, Delivery.first("generator"), deps), TIME_BUDGET_S)
            )
        except asyncio.TimeoutError:
            pytest.fail(f"FINDING: no outcome within {TIME_BUDGET_S}s for config {config_id!r}")
        seconds = time.perf_counter() - t0
        assert len(out) == 1 and out[0].type == CONTENT_GENERATED and out[0].data.request_id == event.id
        headers, body = encode_binary(out[0])
        outcome = Outcome(out[0].data, json.dumps(headers).encode() + b"\n" + body, seconds)
        for s in (secret, *leaks):
            assert s.encode() not in outcome.wire, f"the outcome leaks {s!r}"
        assert outcome.seconds < TIME_BUDGET_S
        return outcome

    return _generate


def write_config(configs_dir: Path, doc: dict) -> Path:
    configs_dir.mkdir(parents=True, exist_ok=True)
    path = configs_dir / f"{doc['id']}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def configs(tmp_path) -> Path:
    return tmp_path / "configs"


def render(generate, configs: Path, template: str, context: dict | None = None) -> Outcome:
    write_config(configs, {"id": "payload", "generator": "jinja2", "template": template, "context": {"name": "Ada"}})
    return generate(configs, "payload", context)


def assert_refused(outcome: Outcome, codes: set[str]) -> None:
    data = outcome.data
    assert data.status == "error", f"rendered: {data.content!r:.300}"
    assert data.content is None and data.content_ref is None
    assert data.error is not None
    assert "MemoryError" not in data.error.message, f"a raw MemoryError reached the outcome: {data.error.message}"
    assert data.error.code in codes, f"{data.error.code}: {data.error.message}"


# --------------------------------------------------------------------------- positive control


def test_control_a_plain_template_renders(generate, configs):
    out = render(generate, configs, "Hello {{ name }}, {{ items|join(', ') }}!", {"items": ["a", "b"]})
    assert out.data.status == "success" and out.data.content == "Hello Ada, a, b!"


def test_control_context_values_are_data_not_templates(generate, configs, secret):
    """A context value that looks like a template is printed, never evaluated."""
    payload = "{{ cycler.__init__.__globals__.os.environ['%s'] }}" % ENV_SECRET_NAME
    out = render(generate, configs, "{{ note }}", {"note": payload})
    assert out.data.status == "success" and out.data.content == payload


# --------------------------------------------------------------------------- escapes (SSTI)

SANDBOX_ESCAPES = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{{ name.__class__.__base__.__subclasses__() }}",
    "{{ (1).__class__ }}",
    "{{ dict.__class__ }}",
    "{{ name.__init__ }}",
    "{{ name.__len__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ cycler.__init__.__globals__.__builtins__.__import__('os').environ }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum.__globals__['os'].environ }}",
    "{{ lipsum.__globals__.__builtins__ }}",
    "{{ lipsum.__code__ }}",
    "{{ range.__doc__ }}",
    "{{ cycler.__init__.__code__.co_consts }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    "{% for x in [1] %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    # attribute access spelled differently
    "{{ name['__class__'] }}",
    "{{ name|attr('__class__') }}",
    "{{ name|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ name|attr('__cla' ~ 'ss__') }}",
    # format-string tricks: the format mini-language reaches attributes too
    "{{ '{0.__class__}'.format(name) }}",
    "{{ '{0.__class__.__mro__}'.format(name) }}",
    "{{ '{0.__init__.__globals__}'.format(cycler) }}",
    "{{ '{x.__class__}'.format_map({'x': name}) }}",
    "{{ '%s' % cycler.__init__.__globals__ }}",
    "{{ '%s'|format(cycler.__init__.__globals__) }}",
    "{{ '%(a)s'|format(a=lipsum.__globals__) }}",
    # mutating shared state
    "{{ defaults.update({'a': 1}) }}",
    "{{ defaults.__setitem__('a', 1) }}",
    "{{ items.append(1) }}",
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES)
def test_sandbox_escape_is_refused(generate, configs, template):
    out = render(generate, configs, template, {"defaults": {"k": "v"}, "items": [1]})
    assert_refused(out, {"TEMPLATE_SECURITY"})


@pytest.mark.parametrize(
    "template",
    [
        "{{ config }}",
        "{{ config.items() }}",
        "{{ config.__class__.__init__.__globals__ }}",
        "{{ request }}",
        "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}",
        "{{ settings.SECRET_KEY }}",
        "{{ getattr }}",
        "{{ __import__('os').environ }}",
        "{{ __builtins__ }}",
        "{{ os.environ }}",
        "{{ environ }}",
        "{{ range.__self__ }}",
        "{{ name.format.__self__ }}",
        "{{ namespace(a=1).__dict__ }}",
    ],
)
def test_lookups_of_framework_objects_find_nothing(generate, configs, template):
    """Flask/Django-style names (config, request, settings) and builtins are not in the sandbox."""
    assert_refused(render(generate, configs, template), {"TEMPLATE_SECURITY"} | UNDEFINED)


@pytest.mark.parametrize(
    "fmt",
    [
        "{0.__class__.__mro__}",
        "{0.__init__.__globals__[os].environ}",
        "{0.__globals__}",
        "{0.__class__.__base__.__subclasses__}",
    ],
)
def test_format_strings_from_the_request_are_sandboxed_too(generate, configs, fmt):
    """The format string comes from the request's context (data), the object from the template."""
    for template in ("{{ fmt.format(cycler) }}", "{{ fmt.format(lipsum) }}", "{{ fmt.format_map({'0': name}) }}"):
        out = render(generate, configs, template, {"fmt": fmt})
        assert_refused(out, {"TEMPLATE_SECURITY", "TEMPLATE_ERROR"} | UNDEFINED)


# --------------------------------------------------------------------------- exhaustion

# Each of these must be stopped early: refused (sandbox or output limit or a clean error)
# within TIME_BUDGET_S, by an in-template check or by the worker's OS limits.
DOUBLING = "{% set s = 'a' * 1000000 %}" + "{% set s = s ~ s %}" * 12 + "{{ s|length }}"
DOUBLING_PLUS = "{% set s = 'a' * 1000000 %}" + "{% set s = s + s %}" * 12 + "{{ s|length }}"
DOUBLING_JOIN = "{% set s = 'a' * 1000000 %}" + "{% set s = [s, s]|join %}" * 12 + "{{ s|length }}"
DOUBLING_LOOP = (
    "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
)
DOUBLING_TUPLE = "{% set t = (1,) * 1000000 %}" + "{% set t = t + t %}" * 12 + "{{ t|length }}"
BIGNUM_SQUARING = "{% set n = 9 ** 4096 %}" + "{% set n = n * n %}" * 16 + "{{ n > 1 }}"
MACRO_TREE = "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
MACRO_TREE_SILENT = (
    "{% macro f(n) %}{% if n > 0 %}{% set _ = f(n - 1) %}{% set _ = f(n - 1) %}{% endif %}{% endmacro %}{{ f(40) }}"
)

EXHAUSTION = {
    "repeat str 10**8": "{{ 'a' * 10**8 }}",
    "repeat str 10**8 reversed": "{{ 10**8 * 'a' }}",
    "repeat list 10**8": "{{ ['a'] * 10**8 }}",
    "repeat a joined range": "{{ range(99999)|join(',') * 10 }}",
    "power 9**(9**9)": "{{ 9 ** (9 ** 9) }}",
    "power of a huge base": "{{ (9 ** 4096) ** 4096 }}",
    "for loop 10**9": "{% for i in range(10**9) %}{% endfor %}",
    "for loop 10**9 with output": "{% for i in range(10**9) %}x{% endfor %}",
    "huge range to list": "{{ range(10**9)|list|length }}",
    "huge range 10**18": "{{ range(1, 10**18)|length }}",
    "output loop past the limit": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    "infinite macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "nested loops 10**10 silent": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops 10**15 silent": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
        "{% endfor %}{% endfor %}{% endfor %}"
    ),
    "doubling with ~ and set": DOUBLING,
    "doubling with + and set": DOUBLING_PLUS,
    "doubling with join and set": DOUBLING_JOIN,
    "doubling in a loop through namespace": DOUBLING_LOOP,
    "doubling a tuple": DOUBLING_TUPLE,
    "bignum squaring": BIGNUM_SQUARING,
    "exponential macro recursion": MACRO_TREE,
    "exponential macro recursion silent": MACRO_TREE_SILENT,
    "percent format width 10**9": "{{ '%1000000000d' % 1 }}",
    "format filter width 10**9": "{{ '%1000000000d'|format(1) }}",
    "str.format width 10**9": "{{ '{:>1000000000}'.format(1) }}",
    "center filter 10**9": "{{ 'a'|center(10**9) }}",
    "indent filter 10**9": "{{ 'a'|indent(10**9) }}",
    "str.ljust 10**9": "{{ 'a'.ljust(10**9) }}",
    "str.zfill 10**9": "{{ 'a'.zfill(10**9) }}",
    "lipsum 10**9 paragraphs": "{{ lipsum(10**9) }}",
    "repr of a list of 1000 one-MB strings": "{{ ['x' * 1000000] * 1000 }}",
}


@pytest.mark.parametrize("template", list(EXHAUSTION.values()), ids=list(EXHAUSTION))
def test_resource_exhaustion_is_stopped_in_bounded_time_and_memory(generate, configs, template):
    assert_refused(render(generate, configs, template), REFUSED)


# --------------------------------------------------------------------------- config ids


@pytest.mark.parametrize(
    "config_id",
    [
        "../hello",
        "../../etc/passwd",
        "/etc/passwd",
        "hello/../hello",
        "..\\hello",
        "C:\\hello",
        "hello\x00",
        "hel\x00lo",
        "hello\n",
        "Hello",
        "hello.json",
        "hell\u043e",  # Cyrillic o
        "hello\u2010x",  # hyphen lookalike
        "\uff48\uff45\uff4c\uff4c\uff4f",  # fullwidth "hello"
        "hello\u200b",  # zero-width space
        "hello\u0301",  # combining accent
        "\u212aelvin",  # Kelvin sign (lowercases to k)
        "",
        "h" * 129,
    ],
)
def test_bad_config_ids_are_refused_before_any_path_is_built(generate, tmp_path, config_id):
    configs = tmp_path / "configs"
    write_config(configs, {"id": "hello", "generator": "jinja2", "template": "hi"})
    (tmp_path / "hello.json").write_text(
        json.dumps({"id": "hello", "generator": "demonstration", "example_output": "OUTSIDE"})
    )
    out = generate(configs, config_id, leaks=("OUTSIDE",))
    assert out.data.status == "error" and out.data.error.code == "INVALID_CONFIG_ID", out.data.error


# --------------------------------------------------------------------------- template_file paths


@pytest.fixture
def tree(tmp_path) -> dict:
    """configs/ with a good template, and a secret file beside (outside) it."""
    configs = tmp_path / "configs"
    (configs / "templates").mkdir(parents=True)
    (configs / "templates" / "ok.j2").write_text("inside {{ name }}")
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = "OUTSIDE-" + secrets.token_hex(8)
    (outside / "secret.j2").write_text(f"{marker} {{{{ name }}}}")
    (tmp_path / "secret.j2").write_text(f"{marker} {{{{ name }}}}")
    return {"configs": configs, "outside": outside, "marker": marker, "root": tmp_path}


def use_template_file(generate, tree, template_file: str) -> Outcome:
    write_config(
        tree["configs"], {"id": "t", "generator": "jinja2", "template_file": template_file, "context": {"name": "x"}}
    )
    return generate(tree["configs"], "t", leaks=(tree["marker"],))


def test_control_template_file_inside_renders(generate, tree):
    os.symlink(tree["configs"] / "templates" / "ok.j2", tree["configs"] / "templates" / "alias.j2")
    for tf in ("templates/ok.j2", "templates/alias.j2", "./templates/../templates/ok.j2"):
        out = use_template_file(generate, tree, tf)
        assert out.data.status == "success" and out.data.content == "inside x", tf


@pytest.mark.parametrize(
    "template_file",
    [
        "../secret.j2",
        "../outside/secret.j2",
        "templates/../../secret.j2",
        "templates/../../outside/secret.j2",
        "./../secret.j2",
    ],
)
def test_template_file_climbing_out_is_refused(generate, tree, template_file):
    out = use_template_file(generate, tree, template_file)
    assert out.data.status == "error" and out.data.error.code == "PATH_OUTSIDE_CONFIGS", out.data.error


def test_absolute_template_file_is_refused(generate, tree):
    for tf in (str(tree["outside"] / "secret.j2"), str(tree["root"] / "secret.j2"), "/dev/zero", "/proc/self/environ"):
        out = use_template_file(generate, tree, tf)
        assert out.data.status == "error" and out.data.error.code == "PATH_OUTSIDE_CONFIGS", (tf, out.data.error)


def test_symlinks_out_of_the_configs_dir_are_refused(generate, tree):
    configs = tree["configs"]
    os.symlink(tree["outside"] / "secret.j2", configs / "templates" / "link.j2")  # a file link
    os.symlink(tree["outside"], configs / "linked-dir")  # a directory link
    os.symlink("/proc/self/environ", configs / "templates" / "environ.j2")
    for tf in ("templates/link.j2", "linked-dir/secret.j2", "templates/environ.j2"):
        out = use_template_file(generate, tree, tf)
        assert out.data.status == "error" and out.data.error.code == "PATH_OUTSIDE_CONFIGS", (tf, out.data.error)
    # the config file itself as a link to a config outside
    (tree["outside"] / "evil.json").write_text(
        json.dumps({"id": "evil", "generator": "demonstration", "example_output": tree["marker"]})
    )
    os.symlink(tree["outside"] / "evil.json", configs / "evil.json")
    out = generate(configs, "evil", leaks=(tree["marker"],))
    assert out.data.status == "error" and out.data.error.code == "PATH_OUTSIDE_CONFIGS", out.data.error


def test_special_files_are_refused_without_blocking(generate, tree):
    """A FIFO would block an open() forever; a directory is not a template."""
    os.mkfifo(tree["configs"] / "templates" / "fifo.j2")
    for tf in ("templates/fifo.j2", "templates", "."):
        out = use_template_file(generate, tree, tf)
        assert out.data.status == "error" and out.data.error.code == "TEMPLATE_NOT_FOUND", (tf, out.data.error)


@pytest.mark.parametrize(
    "template_file",
    [
        "..\\secret.j2",  # Windows separators are plain characters on POSIX: a missing file inside
        "templates\\..\\..\\secret.j2",
        "C:\\secret.j2",
        "\\\\server\\share\\secret.j2",
        "templates\uff0f..\uff0f..\uff0fsecret.j2",  # fullwidth solidus
        "\uff0e\uff0e/secret.j2",  # fullwidth full stops
        "\u2024\u2024/secret.j2",  # one dot leaders
        "templates\u2215..\u2215..\u2215secret.j2",  # division slash
        "~/secret.j2",
        "$HOME/secret.j2",
        "file:///etc/passwd",
    ],
)
def test_lookalike_and_windows_paths_stay_inside(generate, tree, template_file):
    out = use_template_file(generate, tree, template_file)
    assert out.data.status == "error" and out.data.error.code == "TEMPLATE_NOT_FOUND", out.data.error


@pytest.mark.parametrize(
    "template_file", ["templates/ok.j2\x00", "\x00", "../secret.j2\x00.txt", "templates/\x00/ok.j2"]
)
def test_nul_bytes_in_template_file_are_a_config_error(generate, tree, template_file):
    """A NUL byte cannot name a file: the config is invalid (not a generator crash)."""
    out = use_template_file(generate, tree, template_file)
    assert out.data.status == "error"
    assert out.data.error.code in {"CONFIG_INVALID", "PATH_OUTSIDE_CONFIGS", "TEMPLATE_NOT_FOUND"}, out.data.error
