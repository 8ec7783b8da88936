"""The built-in generators and the entry-point registry."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from services.generator.generators import registry as gen_mod
from composition.configs import ContentConfig, GenerationError, LoadedConfig
from services.generator.generators import (
    DemonstrationGenerator,
    GeneratorRegistry,
    Jinja2Generator,
    TemplateFillGenerator,
    get_generator,
)


def cfg(template: str | None = None, *, id: str = "t", generator: str = "jinja2", **fields) -> LoadedConfig:
    import hashlib

    spec = ContentConfig(id=id, generator=generator, template=template, **fields)
    return LoadedConfig(
        spec=spec,
        path=Path(f"/nowhere/{id}.json"),
        template=template,
        template_hash=hashlib.sha256(template.encode()).hexdigest() if template is not None else None,
        defaults=dict(spec.context),
    )


def failure(gen, config, context) -> GenerationError:
    with pytest.raises(GenerationError) as ei:
        gen.render(config, context)
    return ei.value


# --------------------------------------------------------------------------- jinja2


def test_jinja2_renders_loops_conditionals_and_filters():
    t = "{% for x in items %}{{ x | upper }}{% if not loop.last %}, {% endif %}{% endfor %}{% if n > 1 %}!{% endif %}"
    assert Jinja2Generator().render(cfg(t), {"items": ["a", "b"], "n": 2}) == "A, B!"


def test_jinja2_keeps_trailing_newline_and_trims_blocks():
    t = "{% for x in xs %}\n- {{ x }}\n{% endfor %}\n"
    assert Jinja2Generator().render(cfg(t), {"xs": [1, 2]}) == "- 1\n- 2\n"


def test_jinja2_does_not_autoescape():
    assert Jinja2Generator().render(cfg("{{ v }}"), {"v": "<b>&</b>"}) == "<b>&</b>"


def test_jinja2_missing_variable_names_it_and_its_line():
    err = failure(Jinja2Generator(), cfg("line one\n{{ greeting }} {{ who }}"), {"greeting": "hi"})
    assert err.code == "MISSING_VARIABLE"
    assert "'who'" in err.message
    assert "line 2" in err.message


def test_jinja2_missing_attribute_is_a_missing_variable():
    err = failure(Jinja2Generator(), cfg("{{ user.email }}"), {"user": {"name": "x"}})
    assert err.code == "MISSING_VARIABLE" and "email" in err.message


def test_jinja2_strict_undefined_still_allows_default_and_is_defined():
    t = "{{ who | default('nobody') }}{% if other is defined %}!{% endif %}"
    assert Jinja2Generator().render(cfg(t), {}) == "nobody"


def test_jinja2_syntax_error_reports_line():
    err = failure(Jinja2Generator(), cfg("ok\nok\n{% for x in %}\n{% endfor %}"), {})
    assert err.code == "TEMPLATE_ERROR"
    assert "line 3" in err.message


def test_jinja2_unclosed_block_is_a_template_error():
    assert failure(Jinja2Generator(), cfg("{% if x %}never closed"), {"x": 1}).code == "TEMPLATE_ERROR"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ x.__class__ }}",
        "{{ 'a' * 100000000 }}",
        "{{ [1] * 100000000 }}",
        "{{ 9 ** 99999 }}",
    ],
)
def test_jinja2_sandbox_blocks_unsafe_templates(template):
    err = failure(Jinja2Generator(), cfg(template), {"x": "s"})
    assert err.code == "TEMPLATE_SECURITY"


def test_jinja2_runtime_error_is_a_template_error_with_line():
    err = failure(Jinja2Generator(), cfg("a\n{{ 1 // zero }}"), {"zero": 0})
    assert err.code == "TEMPLATE_ERROR"
    assert "ZeroDivisionError" in err.message and "line 2" in err.message


def test_jinja2_runaway_output_is_stopped_early():
    gen = Jinja2Generator(max_output_chars=1000)
    err = failure(gen, cfg("{% for i in range(100000) %}{{ line }}{% endfor %}"), {"line": "x" * 100})
    assert err.code == "OUTPUT_TOO_LARGE"


def test_jinja2_without_template_is_config_invalid():
    err = failure(Jinja2Generator(), cfg(None), {})
    assert err.code == "CONFIG_INVALID" and "template" in err.message


def test_jinja2_compiles_once_per_template_version():
    gen = Jinja2Generator()
    c1 = cfg("v1 {{ a }}", id="same")
    assert gen.compile(c1) is gen.compile(c1)
    first = gen.compile(c1)
    c2 = cfg("v2 {{ a }}", id="same")
    second = gen.compile(c2)
    assert second is not first
    assert gen.render(c2, {"a": 1}) == "v2 1"
    assert len(gen._compiled) == 1  # the old version is dropped, not kept forever
    other = cfg("v1 {{ a }}", id="other")
    assert gen.compile(other) is not second
    assert gen.render(other, {"a": 2}) == "v1 2"


def test_jinja2_cannot_mutate_shared_defaults():
    c = cfg("{{ xs.append(4) }}{{ d.update({'k': 1}) }}", context={"xs": [1], "d": {}})
    err = failure(Jinja2Generator(), c, dict(c.defaults))
    assert err.code == "TEMPLATE_SECURITY"
    assert c.defaults == {"xs": [1], "d": {}}


def test_jinja2_does_not_mutate_the_context():
    ctx = {"xs": [1]}
    Jinja2Generator().render(cfg("{% set y = 2 %}{{ xs }}{{ y }}"), ctx)
    assert ctx == {"xs": [1]}


# --------------------------------------------------------------------------- template_fill


def fill(template, context, **kw):
    return TemplateFillGenerator().render(cfg(template, generator="template_fill", **kw), context)


def test_template_fill_substitutes_with_and_without_spaces():
    assert fill("{{ a }}-{{b}}-{{  a  }}", {"a": "x", "b": "y"}) == "x-y-x"


def test_template_fill_dotted_names_and_list_indices():
    ctx = {"user": {"name": "Ada", "roles": ["admin", "dev"]}}
    assert fill("{{ user.name }} is {{ user.roles.1 }}", ctx) == "Ada is dev"


def test_template_fill_value_formatting():
    ctx = {"n": 3, "f": 1.5, "t": True, "none": None, "obj": {"k": "é"}, "lst": [1, "a"]}
    out = fill("{{n}} {{f}} {{t}} {{none}} {{obj}} {{lst}}", ctx)
    assert out == '3 1.5 true null {"k": "é"} [1, "a"]'


def test_template_fill_has_no_logic_and_never_reexpands_values():
    assert fill("{{ a }}", {"a": "{{ b }}", "b": "no"}) == "{{ b }}"
    assert fill("no placeholders at all { } }}", {}) == "no placeholders at all { } }}"


@pytest.mark.parametrize(
    "template, name",
    [("{{ missing }}", "missing"), ("x\n{{ a.b }}", "a.b"), ("{{ a.c.d }}", "a.c.d"), ("{{ l.5 }}", "l.5")],
)
def test_template_fill_missing_variable(template, name):
    with pytest.raises(GenerationError) as ei:
        fill(template, {"a": {"c": "str"}, "l": [1]})
    assert ei.value.code == "MISSING_VARIABLE"
    assert repr(name) in ei.value.message


def test_template_fill_missing_variable_reports_line():
    with pytest.raises(GenerationError) as ei:
        fill("one\ntwo\n{{ gone }}", {})
    assert "line 3" in ei.value.message


@pytest.mark.parametrize(
    "template", ["{{ name | upper }}", "{% if x %}{{ x }}{% endif %}{{ x y }}", "{{ }}", "{{ 1abc }}"]
)
def test_template_fill_refuses_anything_but_plain_names(template):
    with pytest.raises(GenerationError) as ei:
        fill(template, {"name": "a", "x": 1, "y": 2})
    assert ei.value.code == "TEMPLATE_ERROR"


def test_template_fill_without_template_is_config_invalid():
    with pytest.raises(GenerationError) as ei:
        fill(None, {})
    assert ei.value.code == "CONFIG_INVALID"


def test_template_fill_recompiles_on_template_change():
    gen = TemplateFillGenerator()
    assert gen.render(cfg("A {{x}}", id="c", generator="template_fill"), {"x": 1}) == "A 1"
    assert gen.render(cfg("B {{x}}", id="c", generator="template_fill"), {"x": 1}) == "B 1"


# --------------------------------------------------------------------------- demonstration


def test_demonstration_returns_example_output_ignoring_context():
    c = cfg(None, generator="demonstration", example_output="Example {{ not rendered }}")
    assert DemonstrationGenerator().render(c, {"not": 1}) == "Example {{ not rendered }}"


def test_demonstration_without_example_output_is_config_invalid():
    err = failure(DemonstrationGenerator(), cfg(None, generator="demonstration"), {})
    assert err.code == "CONFIG_INVALID" and "example_output" in err.message


# --------------------------------------------------------------------------- registry


def test_registry_loads_the_declared_entry_points():
    reg = GeneratorRegistry()
    assert {"jinja2", "template_fill", "demonstration"} <= set(reg.names())
    assert isinstance(reg.get_generator("jinja2"), Jinja2Generator)
    assert isinstance(reg.get_generator("template_fill"), TemplateFillGenerator)
    assert isinstance(reg.get_generator("demonstration"), DemonstrationGenerator)
    assert reg.get_generator("jinja2") is reg.get_generator("jinja2")


def test_module_level_get_generator():
    assert isinstance(get_generator("jinja2"), Jinja2Generator)


def test_unknown_generator():
    with pytest.raises(GenerationError) as ei:
        GeneratorRegistry().get_generator("no-such-generator")
    assert ei.value.code == "UNKNOWN_GENERATOR"
    assert "no-such-generator" in ei.value.message and "jinja2" in ei.value.message


def test_entry_points_are_read_once_and_broken_ones_are_reported(monkeypatch):
    calls = []
    eps = [
        EntryPoint("demo2", "services.generator.generators:DemonstrationGenerator", "chora.generators"),
        EntryPoint("broken", "no_such_module_xyz:Gen", "chora.generators"),
        EntryPoint("not-a-generator", "services.generator.generators:MAX_OUTPUT_CHARS", "chora.generators"),
    ]

    def fake_entry_points(*, group):
        calls.append(group)
        return eps

    monkeypatch.setattr(gen_mod, "entry_points", fake_entry_points)
    reg = GeneratorRegistry()
    assert isinstance(reg.get_generator("demo2"), DemonstrationGenerator)
    for name in ("broken", "not-a-generator", "missing"):
        with pytest.raises(GenerationError) as ei:
            reg.get_generator(name)
        assert ei.value.code == "UNKNOWN_GENERATOR"
    assert calls == ["chora.generators"]
    assert "ModuleNotFoundError" in reg.errors["broken"]
    assert "render" in reg.errors["not-a-generator"]
    with pytest.raises(GenerationError) as ei:
        reg.get_generator("broken")
    assert "failed to load" in ei.value.message


def test_registered_generators_win_and_need_no_entry_points():
    class Echo:
        name = "echo"

        def render(self, config, context):
            return repr(context)

    reg = GeneratorRegistry({"jinja2": Echo()}, load_entry_points=False)
    assert isinstance(reg.get_generator("jinja2"), Echo)
    with pytest.raises(GenerationError):
        reg.get_generator("template_fill")
    reg.register("template_fill", Echo())
    assert isinstance(reg.get_generator("template_fill"), Echo)
