"""Validation rules: the ``validation`` list of a content config, parsed once.

Each item of the list is one rule, told apart by its ``type``; every rule has
``severity`` (``error``, the default, or ``warning``) and an optional
``message`` that is shown in front of what was found::

    validation:
      - {type: length, min_words: 50, max_chars: 20000}
      - {type: required_sections, sections: [Added, Fixed], level: 2}
      - {type: regex, pattern: '^# ', flags: [m]}
      - {type: regex, pattern: 'internal\\.example', must: not_match, severity: warning}
      - {type: json_schema, schema: {type: object, required: [name]}}
      - {type: placeholders}                      # [TBD], TODO, lorem ipsum, a trailing "..."

Rule types:

- ``length``: ``min_chars``/``max_chars`` (characters), ``min_words``/``max_words``
  (runs of non-whitespace), ``min_lines``/``max_lines`` (a final newline does
  not start another line). At least one bound; a min never above its max.
- ``required_sections``: every text in ``sections`` must be the text of a
  markdown ATX heading (``#`` to ``######``), compared case-insensitively with
  runs of whitespace collapsed; with ``level``, at exactly that level.
  Headings inside fenced code blocks do not count.
- ``regex``: ``pattern`` (Python ``re`` syntax, searched anywhere in the
  content), ``must``: ``match`` (default) or ``not_match``, ``flags``: any of
  ``i`` (ignore case), ``m`` (``^``/``$`` at every line), ``s`` (``.`` matches
  a newline). Compiled once; a pattern that does not compile makes the config
  invalid. Patterns are trusted config, run as written: one that starts with
  literal text is searched fastest, one with nested repeats can be slow.
- ``json_schema``: the content must be JSON and match ``schema``, checked by the
  ``jsonschema`` library (see :mod:`services.validator.rules.schema`): Draft
  2020-12 unless ``$schema`` names another draft, ``$ref``/``$defs`` resolved
  inside the schema (nothing is fetched: a reference that does not resolve
  offline makes the config invalid), ``format`` checked. A schema that is not
  valid against its meta-schema makes the config invalid. Each problem is
  reported with the JSON path of the failing value and the keyword, e.g.
  ``$.items[2].name: 3 is not of type 'string' (type)``. Documents past
  1,000,000 characters, 64 levels of nesting or 50,000 values fail the rule
  unchecked.
- ``placeholders``: none of ``patterns`` may appear (literal text; unless
  ``case_sensitive``, the lower-cased pattern in the lower-cased content; as
  whole words where the pattern begins or ends with a letter or digit, so
  ``TODO`` does not match ``todos``; at one place the longest pattern wins,
  so ``[TBD]`` is not also reported as ``TBD``); default
  ``[TBD]``, ``TODO``, ``TBD``, ``FIXME``, ``XXX``, ``lorem ipsum``. With
  ``trailing_ellipsis`` (default true) a ``...`` or ``…`` ending the content or
  a line is a placeholder too.

A failed rule yields one :class:`ValidationIssue` (``rule`` = its type) whose
message says everything that is wrong. A rule set that cannot be built is a
:class:`RulesError` whose ``problems`` name the rule index and what is wrong,
e.g. ``validation[1] (regex): bad pattern '(': missing ), ...``.

:class:`RuleCache` keeps compiled rule sets per ``(config id, config hash)``;
:func:`config_hash` is the version of a loaded config.
"""

from services.validator.rules.cache import (
    RuleCache,
    RulesError,
    RuleSet,
    compile_rules,
    config_hash,
    error_hash,
    is_valid,
    parse_rule,
)
from services.validator.rules.common import DEFAULT_PLACEHOLDERS, Severity
from services.validator.rules.schema import CompiledSchema, DocumentTooBig, SchemaError
from services.validator.rules.text import (
    RULE_MODELS,
    RULE_TYPES,
    Content,
    JsonSchemaRule,
    LengthRule,
    PlaceholdersRule,
    RegexRule,
    RequiredSectionsRule,
    Rule,
)

__all__ = [
    "DEFAULT_PLACEHOLDERS",
    "RULE_MODELS",
    "RULE_TYPES",
    "Content",
    "JsonSchemaRule",
    "LengthRule",
    "PlaceholdersRule",
    "RegexRule",
    "RequiredSectionsRule",
    "Rule",
    "RuleCache",
    "RuleSet",
    "RulesError",
    "SchemaError",
    "CompiledSchema",
    "DocumentTooBig",
    "Severity",
    "compile_rules",
    "config_hash",
    "error_hash",
    "is_valid",
    "parse_rule",
]
