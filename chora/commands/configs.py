"""`chora configs`: list content configs and check them, without NATS.

``chora configs validate [PATH]`` checks every config in the configs directory
(``CHORA_CONFIGS_DIR``), or in the directory PATH, or the one file PATH: that
it loads (format, fields, template file, path safety) and that its
``validation`` rules can be built (known types, compiling patterns, usable
schemas), that its generator is registered (``chora.generators`` entry points)
and that its template compiles (a jinja2 syntax error is reported with the
template file and line), all without rendering. One line per config: ``ok`` or ``INVALID`` with every problem.
Exit 1 if any config is invalid, else 0. A file in the directory whose name is
not a config id is listed as ``skip`` (the services never load it) and does
not fail the run; named explicitly, it does.

With ``--render`` each loadable config is also rendered with its default
context by its generator (which for some generators means calling out, e.g.
to a model API) and its rules applied: an error issue makes it invalid,
warnings are shown. A config whose generator is not ready (a credential not
set: see `chora doctor`) is not rendered; it is reported ``ok`` with
``not rendered: ... not ready``, since the config itself is fine.

``chora configs list [PATH]`` prints one line per config: id, generator,
output format, number of rules, description (or why it is broken).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_INVALID = 0, 1


def register(subparsers: Any) -> None:
    from chora.options import add_command

    p = subparsers.add_parser("configs", help="list and check content configs (no NATS needed)")
    sub = p.add_subparsers(dest="configs_cmd", required=True)

    sp = add_command(
        sub, "validate", json=True, help="check configs and their validation rules; exit 1 if any is invalid"
    )
    sp.add_argument("path", nargs="?", help="a config file or a directory (default: CHORA_CONFIGS_DIR)")
    sp.add_argument(
        "--render",
        action="store_true",
        help="also render each config with its default context and apply its rules",
    )
    sp.set_defaults(func=validate)

    sp = add_command(sub, "list", json=True, help="one line per config: id, generator, format, rules, description")
    sp.add_argument("path", nargs="?", help="a directory (default: CHORA_CONFIGS_DIR)")
    sp.set_defaults(func=list_configs)


# ---------------------------------------------------------------------- finding configs


class _Target:
    def __init__(self, store: Any, ids: list[str], skipped: list[str], bad_names: list[str], where: Path):
        self.store, self.ids, self.skipped, self.bad_names, self.where = store, ids, skipped, bad_names, where


def _configs_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from chora.common import load_settings

    return Path(load_settings().configs_dir)


def _target(path: Path) -> _Target | str:
    """What to check at ``path``, or why there is nothing to check."""
    from composition.configs import EXTENSIONS, ConfigStore, valid_config_id

    if path.is_dir():
        store = ConfigStore(path)
        skipped = sorted(
            name
            for name in os.listdir(path)
            if os.path.splitext(name)[1] in EXTENSIONS and not valid_config_id(os.path.splitext(name)[0])
        )
        return _Target(store, store.list(), skipped, [], path)
    if path.is_file():
        stem, ext = os.path.splitext(path.name)
        if ext not in EXTENSIONS:
            return f"{path} is not a content config file ({', '.join(EXTENSIONS)})"
        if not valid_config_id(stem):
            return _Target(None, [], [], [path.name], path.parent)
        return _Target(ConfigStore(path.parent), [stem], [], [], path.parent)
    if path.exists():
        return f"{path} is neither a file nor a directory"
    return f"{path} does not exist"


# ---------------------------------------------------------------------- validate


def _render(config: Any, registry: Any) -> str:
    gen = registry.get_generator(config.generator)
    out = gen.render(config, dict(config.defaults))
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    if not isinstance(out, str):
        raise TypeError(f"generator {config.generator!r} returned {type(out).__name__}, not text")
    return out


async def _await(aw: Any) -> Any:
    return await aw


def check_config(store: Any, config_id: str, cache: Any, registry: Any, render: bool = False) -> tuple[bool, str]:
    """(ok, what to print after the status) for one config id: it loads, its rules build, its
    generator is registered and its template compiles (with ``render``, also rendered with
    the default context and its rules applied)."""
    from composition.configs import ConfigError, GenerationError
    from services.validator.rules import RulesError, is_valid

    try:
        config = store.get(config_id)
    except ConfigError as e:
        return False, f"{e.code}: {e.message}"
    _, rules = cache.for_config(config)
    if isinstance(rules, RulesError):
        return False, f"{rules.code}: " + "; ".join(rules.problems)
    n = len(rules)
    summary = f"{n} rule{'' if n == 1 else 's'}"
    try:
        gen = registry.get_generator(config.generator)
        if callable(getattr(gen, "compile", None)):
            gen.compile(config)  # parses the template (jinja2 syntax, template_fill placeholders)
    except GenerationError as e:
        return False, f"{e.code}: {e.message}"
    except Exception as e:  # a third-party generator's compile
        return False, f"compiling with {config.generator} failed: {type(e).__name__}: {e}"
    if not render:
        return True, f"{summary}, template compiles" if config.template is not None else summary
    try:
        from services.generator.generators.base import readiness_of

        ready = readiness_of(registry.get_generator(config.generator))
        if not ready.ready:
            return (
                True,
                f"{summary}, not rendered: generator {config.generator!r} is not ready (missing {', '.join(ready.missing)})",
            )
        content = _render(config, registry)
    except GenerationError as e:
        return False, f"rendering with the default context failed: {e.code}: {e.message}"
    except Exception as e:
        return False, f"rendering with the default context failed: {type(e).__name__}: {e}"
    issues = rules.apply(content)
    if not issues:
        return True, f"{summary}, rendered content passes"
    shown = "; ".join(f"{i.severity} {i.rule}: {i.message}" for i in issues)
    if is_valid(issues):
        return True, f"{summary}, rendered content passes with warnings: {shown}"
    return False, f"rendered content fails its rules: {shown}"


def validate(args: argparse.Namespace) -> int:
    from services.validator.rules import RuleCache

    target = _target(_configs_dir(args.path))
    if isinstance(target, str):
        print(f"chora: {target}", file=sys.stderr)
        return EXIT_INVALID
    from services.generator.generators import GeneratorRegistry

    registry = GeneratorRegistry()
    registry.load()
    cache = RuleCache()
    rows: list[tuple[str, str, str]] = [("INVALID", name, _BAD_NAME) for name in target.bad_names]
    for config_id in target.ids:
        good, what = check_config(target.store, config_id, cache, registry, render=args.render)
        rows.append(("ok" if good else "INVALID", config_id, what))
    rows += [("skip", name, _BAD_NAME) for name in target.skipped]
    ok = sum(r[0] == "ok" for r in rows)
    invalid = sum(r[0] == "INVALID" for r in rows)
    if args.json:
        configs = [{"config": name, "status": status.lower(), "detail": what} for status, name, what in rows]
        print(json.dumps({"ok": ok, "invalid": invalid, "configs": configs}))
        return EXIT_INVALID if invalid else EXIT_OK
    width = max([len(r[1]) for r in rows] or [0])
    for status, name, what in rows:
        print(f"{status:<7}  {name:<{width}}  {what}")
    total = ok + invalid
    if total == 0:
        print(f"chora: no content configs in {target.where}", file=sys.stderr)
    else:
        print(f"chora: {total} config{'s' if total != 1 else ''}: {ok} ok, {invalid} invalid", file=sys.stderr)
    return EXIT_INVALID if invalid else EXIT_OK


_BAD_NAME = "the file name is not a config id (^[a-z][a-z0-9-]*$): it is never loaded"


# ---------------------------------------------------------------------- list


def list_configs(args: argparse.Namespace) -> int:
    from composition.configs import ConfigError, ConfigStore

    path = _configs_dir(args.path)
    if not path.is_dir():
        print(f"chora: {path} is not a directory", file=sys.stderr)
        return EXIT_INVALID
    store = ConfigStore(path)
    rows: list[tuple[str, str, str, str, str]] = []
    docs: list[dict[str, Any]] = []
    for config_id in store.list():
        try:
            c = store.get(config_id)
        except ConfigError as e:
            rows.append((config_id, "BROKEN", "", "", f"{e.code}: {e.message}"))
            docs.append({"config": config_id, "error": {"code": e.code, "message": e.message}})
            continue
        n = len(c.spec.validation)
        rows.append((config_id, c.generator, c.output_format, f"{n} rule{'' if n == 1 else 's'}", c.spec.description))
        docs.append(
            {
                "config": config_id,
                "generator": c.generator,
                "output_format": c.output_format,
                "rules": n,
                "description": c.spec.description,
                "error": None,
            }
        )
    if args.json:
        print(json.dumps({"configs": docs}))
        return EXIT_OK
    if not rows:
        print(f"chora: no content configs in {path}", file=sys.stderr)
        return EXIT_OK
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(f"{r[i]:<{widths[i]}}" for i in range(4)) + "  " + " ".join(r[4].split()))
    return EXIT_OK
