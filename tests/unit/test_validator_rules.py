"""The validator's rules: each type passing and failing, severities, and every
kind of unusable rule reported with its index and what is wrong."""

from __future__ import annotations

import pytest

from services.validator.rules import (
    DEFAULT_PLACEHOLDERS,
    RULE_TYPES,
    RuleCache,
    RulesError,
    CompiledSchema,
    SchemaError,
    compile_rules,
    config_hash,
    error_hash,
    is_valid,
)


def issues(rules: list[dict], text: str):
    return compile_rules(rules).apply(text)


def one(rules: list[dict], text: str):
    found = issues(rules, text)
    assert len(found) == 1, found
    return found[0]


def problems(rules) -> list[str]:
    with pytest.raises(RulesError) as e:
        compile_rules(rules)
    return e.value.problems


# --------------------------------------------------------------------------- no rules


def test_no_rules_means_no_issues():
    assert compile_rules([]).apply("anything") == []
    assert compile_rules(None).apply("") == []
    assert is_valid([])


def test_rule_types_are_the_five():
    assert set(RULE_TYPES) == {"length", "required_sections", "regex", "json_schema", "placeholders"}


# --------------------------------------------------------------------------- length


@pytest.mark.parametrize(
    "rule, text, expected",
    [
        ({"min_chars": 5}, "abcde", None),
        ({"min_chars": 5}, "abcd", "4 characters, fewer than the minimum of 5"),
        ({"max_chars": 3}, "ééé", None),  # characters, not bytes
        ({"max_chars": 3}, "abcd", "4 characters, more than the maximum of 3"),
        ({"min_words": 3}, "one  two\n\tthree", None),
        ({"min_words": 3}, "one two", "2 words, fewer than the minimum of 3"),
        ({"max_words": 2}, "a b c", "3 words, more than the maximum of 2"),
        ({"min_lines": 2}, "a\nb\n", None),  # the final newline does not start a line
        ({"max_lines": 2}, "a\nb\n", None),
        ({"max_lines": 2}, "a\nb\nc", "3 lines, more than the maximum of 2"),
        ({"min_lines": 1}, "", "0 lines, fewer than the minimum of 1"),
        ({"min_chars": 0, "max_chars": 0}, "", None),
    ],
)
def test_length(rule, text, expected):
    found = issues([{"type": "length", **rule}], text)
    if expected is None:
        assert found == []
    else:
        (i,) = found
        assert i.rule == "length" and i.severity == "error"
        assert expected in i.message


def test_length_reports_every_violated_unit_in_one_issue():
    i = one([{"type": "length", "max_chars": 3, "min_words": 5, "min_lines": 2}], "abcd efgh")
    assert "9 characters" in i.message and "2 words" in i.message and "1 lines" in i.message


# --------------------------------------------------------------------------- required_sections

DOC = """# Release 1.0

## Added
- things

### Fixed ###
- bugs

```markdown
## Removed
```

    ## Indented code is not a heading either
#NoSpace is not a heading
"""


def test_required_sections_present_case_insensitive_and_whitespace_collapsed():
    assert issues([{"type": "required_sections", "sections": ["added", "FIXED", "release  1.0"]}], DOC) == []


def test_required_sections_missing_are_all_named():
    i = one([{"type": "required_sections", "sections": ["Added", "Removed", "Deprecated", "NoSpace"]}], DOC)
    assert i.rule == "required_sections"
    assert "'Removed'" in i.message and "'Deprecated'" in i.message and "'NoSpace'" in i.message
    assert "'Added'" not in i.message  # present


def test_required_sections_is_exact_text_not_substring():
    assert issues([{"type": "required_sections", "sections": ["Add"]}], DOC)


def test_required_sections_level():
    assert issues([{"type": "required_sections", "sections": ["Added"], "level": 2}], DOC) == []
    i = one([{"type": "required_sections", "sections": ["Fixed"], "level": 2}], DOC)
    assert "level-2" in i.message and "'Fixed'" in i.message
    assert issues([{"type": "required_sections", "sections": ["Fixed"], "level": 3}], DOC) == []


def test_headings_inside_fences_do_not_count_but_after_the_fence_they_do():
    text = "~~~\n# Hidden\n~~~\n## Shown\n"
    assert issues([{"type": "required_sections", "sections": ["Shown"]}], text) == []
    assert issues([{"type": "required_sections", "sections": ["Hidden"]}], text)


# --------------------------------------------------------------------------- regex


def test_regex_must_match():
    assert issues([{"type": "regex", "pattern": r"v\d+\.\d+"}], "release v1.2 is out") == []
    i = one([{"type": "regex", "pattern": r"v\d+\.\d+"}], "release one")
    assert i.rule == "regex" and "does not match /v\\d+\\.\\d+/" in i.message


def test_regex_must_not_match_names_the_line_and_the_match():
    i = one([{"type": "regex", "pattern": r"secret-\w+", "must": "not_match"}], "ok\nkey: secret-abc\n")
    assert "line 2" in i.message and "secret-abc" in i.message
    assert issues([{"type": "regex", "pattern": "secret", "must": "not_match"}], "nothing here") == []


@pytest.mark.parametrize(
    "flags, pattern, text, passes",
    [
        ([], "^b$", "a\nb", False),
        (["m"], "^b$", "a\nb", True),
        ([], "HELLO", "hello", False),
        (["i"], "HELLO", "hello", True),
        ([], "a.b", "a\nb", False),
        (["s"], "a.b", "a\nb", True),
        (["i", "m", "s"], "^X.Y$", "w\nx\ny", True),
    ],
)
def test_regex_flags(flags, pattern, text, passes):
    assert (issues([{"type": "regex", "pattern": pattern, "flags": flags}], text) == []) is passes


def test_regex_compiled_once_when_the_set_is_built():
    rs = compile_rules([{"type": "regex", "pattern": "x+"}])
    compiled = rs.rules[0]._re
    rs.apply("xx")
    rs.apply("y")
    assert rs.rules[0]._re is compiled


# --------------------------------------------------------------------------- json_schema

SCHEMA = {
    "type": "object",
    "required": ["name", "tags"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 5},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "uniqueItems": True},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "count": {"type": "integer"},
        "kind": {"const": "doc"},
        "nothing": {"type": "null"},
    },
}


def schema_issue(doc_text: str, schema=SCHEMA):
    return issues([{"type": "json_schema", "schema": schema}], doc_text)


def test_json_schema_pass():
    assert (
        schema_issue('{"name": "abc", "tags": ["a", "b"], "score": 9.5, "count": 3.0, "kind": "doc", "nothing": null}')
        == []
    )


def test_json_schema_not_json():
    (i,) = schema_issue("{'name': 1}")
    assert i.rule == "json_schema" and "not valid JSON" in i.message and "line 1" in i.message


@pytest.mark.parametrize(
    "doc, expected",
    [
        ('{"tags": ["a"]}', "$: 'name' is a required property (required)"),
        ('{"name": 3, "tags": ["a"]}', "$.name: 3 is not of type 'string' (type)"),
        ('{"name": "a", "tags": ["a"]}', "$.name: 'a' is too short (minLength)"),
        ('{"name": "abcdef", "tags": ["a"]}', "$.name: 'abcdef' is too long (maxLength)"),
        ('{"name": "ab", "tags": []}', "$.tags: [] should be non-empty (minItems)"),
        ('{"name": "ab", "tags": ["c"]}', "$.tags[0]: 'c' is not one of ['a', 'b'] (enum)"),
        (
            '{"name": "ab", "tags": ["a", "a"]}',
            "$.tags: has non-unique elements (item 1 repeats an earlier one) (uniqueItems)",
        ),
        ('{"name": "ab", "tags": ["a"], "score": 11}', "$.score: 11 is greater than the maximum of 10 (maximum)"),
        ('{"name": "ab", "tags": ["a"], "score": -1}', "$.score: -1 is less than the minimum of 0 (minimum)"),
        ('{"name": "ab", "tags": ["a"], "score": true}', "$.score: True is not of type 'number' (type)"),
        ('{"name": "ab", "tags": ["a"], "count": 1.5}', "$.count: 1.5 is not of type 'integer' (type)"),
        ('{"name": "ab", "tags": ["a"], "kind": "x"}', "$.kind: 'doc' was expected (const)"),
        (
            '{"name": "ab", "tags": ["a"], "extra": 1}',
            "$: Additional properties are not allowed ('extra' was unexpected) (additionalProperties)",
        ),
        ("[1, 2]", "$: [1, 2] is not of type 'object' (type)"),
    ],
)
def test_json_schema_failures(doc, expected):
    (i,) = schema_issue(doc)
    assert expected in i.message, i.message


def test_json_schema_lists_a_bounded_number_of_errors():
    (i,) = schema_issue("[1, 2, 3, 4, 5, 6, 7]", {"items": {"type": "string"}})
    assert "$[4]: 5 is not of type" in i.message and "$[5]" not in i.message and i.message.endswith("(and more)")


@pytest.mark.parametrize(
    "schema, good, bad",
    [
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "1", "1.5"),
        ({"oneOf": [{"type": "integer"}, {"minimum": 5}]}, "3", "7"),
        ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, "7", "3"),
        ({"not": {"type": "string"}}, "1", '"s"'),
        ({"type": ["string", "null"]}, "null", "1"),
        ({"type": "string", "pattern": "^v\\d"}, '"v1"', '"1"'),
        ({"exclusiveMinimum": 0, "exclusiveMaximum": 1}, "0.5", "1"),
        ({"multipleOf": 0.5}, "2.5", "2.2"),
        ({"minProperties": 1, "maxProperties": 1}, '{"a": 1}', "{}"),
        ({"enum": [1, True]}, "true", "1.5"),
        ({"enum": [True]}, "true", "1"),  # JSON true is not 1
        ({"additionalProperties": {"type": "integer"}}, '{"a": 1}', '{"a": "x"}'),
        ({"items": True}, '[1, "x"]', None),
        ({"properties": {"a": False}}, "{}", '{"a": 1}'),
    ],
)
def test_json_schema_more_keywords(schema, good, bad):
    assert schema_issue(good, schema) == []
    if bad is not None:
        assert schema_issue(bad, schema)


def test_compiled_schema_names_the_place_in_the_schema():
    with pytest.raises(SchemaError, match=r"schema\.properties\.a\.type: 3 is not valid"):
        CompiledSchema({"properties": {"a": {"type": 3}}})
    CompiledSchema({"title": "T", "description": "d", "format": "email", "default": 1})  # annotations


# --------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize(
    "text, found",
    [
        ("Release date: [TBD]", "'[TBD]'"),
        ("TODO: write this", "'TODO'"),
        ("owner tbd", "'TBD'"),
        ("fixme later", "'FIXME'"),
        ("XXX check", "'XXX'"),
        ("Lorem Ipsum dolor sit amet", "'lorem ipsum'"),
        ("and then...", "trailing ellipsis on line 1"),
        ("first line…\nsecond", "trailing ellipsis on line 1"),
        ("ok\nwait...  \nmore", "trailing ellipsis on line 2"),
        ("ok\r\nwait...\r\nmore", "trailing ellipsis on line 2"),
    ],
)
def test_placeholders_default_patterns(text, found):
    i = one([{"type": "placeholders"}], text)
    assert i.rule == "placeholders" and found in i.message


@pytest.mark.parametrize(
    "text",
    [
        "A clean, finished text.",
        "todos and mastodons are words",  # whole words only
        "an ellipsis... in the middle",
        "XXXL shirts",
    ],
)
def test_placeholders_clean(text):
    assert issues([{"type": "placeholders"}], text) == []


def test_placeholders_counts_and_first_line_and_longest_match():
    i = one([{"type": "placeholders"}], "a\nTODO one\nTODO two\n[TBD]\n")
    assert "'TODO' on line 2 (2 times)" in i.message
    assert "'[TBD]' on line 4" in i.message and "'TBD'" not in i.message.replace("'[TBD]'", "")


def test_placeholders_custom_patterns_case_sensitivity_and_ellipsis_off():
    rules = [{"type": "placeholders", "patterns": ["DRAFT"], "case_sensitive": True, "trailing_ellipsis": False}]
    assert issues(rules, "draft TODO and so on...") == []
    assert "'DRAFT'" in one(rules, "DRAFT v2").message
    assert "TODO" in DEFAULT_PLACEHOLDERS


# --------------------------------------------------------------------------- severities and messages


def test_warnings_do_not_make_content_invalid():
    found = issues(
        [
            {"type": "placeholders", "severity": "warning"},
            {"type": "length", "max_chars": 3, "severity": "warning"},
        ],
        "TODO: more",
    )
    assert [i.severity for i in found] == ["warning", "warning"]
    assert is_valid(found)


def test_one_error_among_warnings_makes_it_invalid():
    found = issues([{"type": "placeholders", "severity": "warning"}, {"type": "regex", "pattern": "^# "}], "TODO")
    assert sorted(i.severity for i in found) == ["error", "warning"]
    assert not is_valid(found)


def test_custom_message_comes_first_with_the_detail():
    i = one([{"type": "regex", "pattern": "^# ", "message": "needs a title"}], "no title")
    assert i.message.startswith("needs a title (") and "does not match" in i.message


def test_issues_in_rule_order_one_per_failed_rule():
    rules = [
        {"type": "length", "min_words": 100},
        {"type": "regex", "pattern": "present"},
        {"type": "required_sections", "sections": ["Missing"]},
    ]
    assert [i.rule for i in issues(rules, "present")] == ["length", "required_sections"]


# --------------------------------------------------------------------------- unusable rules


@pytest.mark.parametrize(
    "rules, expected",
    [
        ([{"type": "contains", "value": "x"}], "validation[0]: unknown rule type 'contains' (known: length, "),
        ([{"pattern": "x"}], "validation[0]: the rule has no 'type'"),
        (["length"], "validation[0]: a rule must be a mapping with a 'type', got str"),
        (
            [{"type": "regex", "pattern": "ok"}, {"type": "regex", "pattern": "(unclosed"}],
            "validation[1] (regex): bad pattern '(unclosed': missing ), unterminated subpattern",
        ),
        ([{"type": "regex"}], "validation[0] (regex): pattern: required field is missing"),
        (
            [{"type": "regex", "pattern": "x", "flags": ["g"]}],
            "validation[0] (regex): flags[0]: Input should be 'i', 'm' or 's', got 'g'",
        ),
        ([{"type": "regex", "pattern": "x", "must": "maybe"}], "validation[0] (regex): must: "),
        (
            [{"type": "regex", "pattern": "x", "severity": "fatal"}],
            "validation[0] (regex): severity: Input should be 'error' or 'warning', got 'fatal'",
        ),
        ([{"type": "regex", "pattern": 42}], "validation[0] (regex): pattern: Input should be a valid string"),
        (
            [{"type": "json_schema", "schema": {"type": "objekt"}}],
            "validation[0] (json_schema): schema.type: 'objekt' is not valid under any of the given schemas",
        ),
        (
            [{"type": "json_schema", "schema": {"$ref": "#/a"}}],
            "validation[0] (json_schema): $ref '#/a' does not resolve inside the schema",
        ),
        (
            [{"type": "json_schema", "schema": {"properties": {"a": {"minLength": -1}}}}],
            "schema.properties.a.minLength: -1 is less than the minimum of 0 (keyword 'minimum' of the meta-schema)",
        ),
        ([{"type": "json_schema", "schema": {"pattern": "("}}], "schema.pattern: '(' is not a 'regex'"),
        ([{"type": "json_schema", "schema": {"required": "name"}}], "schema.required: 'name' is not of type 'array'"),
        ([{"type": "json_schema", "schema": {"items": [{}]}}], "schema.items: [{}] is not of type 'object', 'boolean'"),
        (
            [{"type": "json_schema", "schema": "object"}],
            "validation[0] (json_schema): schema: Input should be a valid dictionary",
        ),
        ([{"type": "json_schema"}], "validation[0] (json_schema): schema: required field is missing"),
        ([{"type": "length"}], "validation[0] (length): a length rule needs at least one of"),
        ([{"type": "length", "min_words": 5, "max_words": 2}], "min_words (5) is greater than max_words (2)"),
        ([{"type": "length", "min_chars": -1}], "min_chars: Input should be greater than or equal to 0"),
        ([{"type": "length", "max_lines": "ten"}], "max_lines: Input should be a valid integer"),
        ([{"type": "length", "max_char": 10}], "validation[0] (length): max_char: unknown field (a typo?)"),
        ([{"type": "required_sections", "sections": []}], "sections: List should have at least 1 item"),
        (
            [{"type": "required_sections", "sections": ["A"], "level": 7}],
            "level: Input should be less than or equal to 6",
        ),
        ([{"type": "required_sections", "sections": ["  "]}], "section '  ' is blank"),
        ([{"type": "placeholders", "patterns": [], "trailing_ellipsis": False}], "checks nothing"),
    ],
)
def test_unusable_rules_are_named_with_index_and_reason(rules, expected):
    found = problems(rules)
    assert any(expected in p for p in found), found


def test_every_problem_of_every_rule_is_listed():
    found = problems([{"type": "nope"}, {"type": "regex", "pattern": "("}, {"type": "length"}])
    assert [p.split(" ", 1)[0].rstrip(":") for p in found] == ["validation[0]", "validation[1]", "validation[2]"]
    assert "; " in str(RulesError(found))


def test_validation_that_is_not_a_list():
    assert problems({"type": "regex"}) == ["validation: must be a list of rules, got dict"]


# --------------------------------------------------------------------------- the cache and versions


class _Cfg:
    def __init__(self, spec, template_hash=None, id="c"):
        self.spec, self.template_hash, self.id = spec, template_hash, id


def test_cache_compiles_once_per_config_version_and_remembers_errors():
    cache = RuleCache()
    rules = [{"type": "regex", "pattern": "x"}]
    a = cache.get("c", "sha256:1", rules)
    assert cache.get("c", "sha256:1", rules) is a
    assert cache.compiled == 1
    cache.get("c", "sha256:2", rules)
    assert cache.compiled == 2
    for _ in range(2):
        with pytest.raises(RulesError):
            cache.get("bad", "sha256:3", [{"type": "nope"}])
    assert cache.compiled == 3


def test_cache_is_bounded():
    cache = RuleCache(maxsize=2)
    for n in range(5):
        cache.get("c", f"sha256:{n}", [])
    assert len(cache) == 2


def test_config_hash_follows_the_content_not_the_formatting(tmp_path):
    from composition.configs import ConfigStore

    (tmp_path / "a.yaml").write_text(
        "id: a\ngenerator: jinja2\ntemplate: hi\nvalidation: [{type: length, min_chars: 1}]\n"
    )
    (tmp_path / "b.json").write_text(
        '{"validation": [{"min_chars": 1, "type": "length"}], "template": "hi", "generator": "jinja2", "id": "b"}'
    )
    store = ConfigStore(tmp_path)
    ha, hb = config_hash(store.get("a")), config_hash(store.get("b"))
    assert ha.startswith("sha256:") and len(ha) == 71
    assert ha != hb  # the ids differ
    (tmp_path / "a.yaml").write_text(
        "# a comment\nid: a\ngenerator: jinja2\ntemplate: hi\nvalidation:\n  - {type: length, min_chars: 1}\n"
    )
    assert config_hash(store.get("a")) == ha
    (tmp_path / "a.yaml").write_text(
        "id: a\ngenerator: jinja2\ntemplate: hi\nvalidation: [{type: length, min_chars: 2}]\n"
    )
    assert config_hash(store.get("a")) != ha


def test_for_config_reuses_the_hash_while_the_config_object_is_the_same():
    cache = RuleCache()
    from types import SimpleNamespace

    spec = SimpleNamespace(validation=[{"type": "length", "max_chars": 1}], model_dump=lambda mode: {"v": 1})
    cfg = _Cfg(spec)
    h1, rs = cache.for_config(cfg)
    spec.model_dump = lambda mode: (_ for _ in ()).throw(AssertionError("hashed again"))
    h2, rs2 = cache.for_config(cfg)
    assert h1 == h2 and rs is rs2 and len(rs) == 1
    assert error_hash("A", "m") != error_hash("A", "n")
