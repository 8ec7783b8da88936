"""The ``template_fill`` and ``demonstration`` generators."""

from __future__ import annotations

import json
import re
from typing import Any

from composition.configs import GenerationError, LoadedConfig
from services.generator.generators.base import Generator, _needs_template

# --------------------------------------------------------------------------- template_fill

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*")


def _fill_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return json.dumps(v, ensure_ascii=False, default=str)


class TemplateFillGenerator(Generator):
    name = "template_fill"

    def __init__(self) -> None:
        # config id -> (template hash, literals, placeholders); placeholders are
        # (dotted name, path parts, line); literals has one more item than placeholders.
        self._compiled: dict[str, tuple[str | None, list[str], list[tuple[str, tuple[str, ...], int]]]] = {}

    def compile(self, config: LoadedConfig) -> tuple[list[str], list[tuple[str, tuple[str, ...], int]]]:
        cached = self._compiled.get(config.id)
        if cached is not None and cached[0] == config.template_hash:
            return cached[1], cached[2]
        source = _needs_template(config, "template_fill")
        literals: list[str] = []
        holes: list[tuple[str, tuple[str, ...], int]] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(source):
            line = source.count("\n", 0, m.start()) + 1
            nm = _NAME.fullmatch(m.group(1))
            if nm is None:
                raise GenerationError(
                    "TEMPLATE_ERROR",
                    f"{config.template_name}, line {line}: {m.group(0)[:80]!r} is not a plain variable; "
                    "template_fill substitutes {{ name }} or {{ a.b }} only (use jinja2 for logic)",
                )
            literals.append(source[pos : m.start()])
            holes.append((nm.group(1), tuple(nm.group(1).split(".")), line))
            pos = m.end()
        literals.append(source[pos:])
        self._compiled[config.id] = (config.template_hash, literals, holes)
        return literals, holes

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        literals, holes = self.compile(config)
        out = [literals[0]]
        for (name, path, line), lit in zip(holes, literals[1:]):
            v: Any = context
            for part in path:
                if isinstance(v, dict) and part in v:
                    v = v[part]
                elif isinstance(v, list) and part.isdigit() and int(part) < len(v):
                    v = v[int(part)]
                else:
                    raise GenerationError(
                        "MISSING_VARIABLE",
                        f"{config.template_name}, line {line}: template variable {name!r} is not in the context",
                    )
            out.append(_fill_value(v))
            out.append(lit)
        return "".join(out)


# --------------------------------------------------------------------------- demonstration


class DemonstrationGenerator(Generator):
    name = "demonstration"

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        out = config.example_output
        if out is None:
            raise GenerationError(
                "CONFIG_INVALID", f"config {config.id!r} uses demonstration but has no example_output"
            )
        return out
