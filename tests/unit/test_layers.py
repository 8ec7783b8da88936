"""The layers go one way: every import of the project's own packages, read with ``ast``,
must point down (contracts < bus < composition < services < chora).

- ``contracts/`` imports nothing of the project;
- ``bus/`` only contracts; ``composition/`` only contracts (the domain has no nats);
- ``services/`` only contracts, bus, composition, the shared modules of services/
  (``services/runtime.py``, ``services/metrics.py``, ...) and its own folder: never another
  service's folder; a shared module imports no service folder;
- ``services/<name>/handlers.py`` nothing of bus;
- ``chora/`` (the command line) is imported by nothing but itself and the tests (and the
  benchmark, which runs the stack as a user would);
- ``chora_client/`` (the client other Python services use) imports only contracts (and
  nats-py); nothing of the project imports it but the CLI, the tests and the benchmark:
  the services are its peers over NATS, not its users.

A failure names every offending import with its file and line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contracts", "bus", "composition", "services", "chora", "chora_client")
# Who may import chora: chora itself, the tests and the benchmark (both drive the stack from outside).
CHORA_USERS = ("chora", "tests", "bench")
CLIENT_USERS = ("chora_client", "chora", "tests", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute name, line), at any depth of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from services import runtime` imports the module services.runtime
            named = {_submodule(module, alias.name) for alias in node.names}
            found.extend((name, node.lineno) for name in sorted(named))
    return found


def _submodule(module: str, name: str) -> str:
    """``module.name`` when that is a module of the project, else ``module``."""
    path = ROOT.joinpath(*module.split("."), name)
    return f"{module}.{name}" if path.is_dir() or path.with_suffix(".py").is_file() else module


def _service_folder(module: str) -> str | None:
    """``services.<name>`` for a module inside a service's folder, else None (a shared module)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "services" and (ROOT / "services" / parts[1]).is_dir():
        return f"services.{parts[1]}"
    return None


def problems(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    me = _module_name(path)
    top = me.split(".")[0]
    mine = _service_folder(me)
    out = []
    for module, line in imports_of(path):
        target = module.split(".")[0]
        if target not in PACKAGES or target == top and top != "services":
            continue
        why = None
        if target == "chora":
            if top not in CHORA_USERS:
                why = "nothing imports the command line package chora"
        elif target == "chora_client":
            if top not in CLIENT_USERS:
                why = "only the CLI, the tests and the benchmark import chora_client (services talk over NATS)"
        elif top == "chora_client":
            if target != "contracts":
                why = "chora_client imports only contracts"
        elif top == "contracts":
            why = "contracts imports nothing of the project"
        elif top in ("bus", "composition"):
            if target != "contracts":
                why = f"{top} imports only contracts"
        elif top == "services":
            theirs = _service_folder(module)
            if theirs is not None and theirs != mine:
                why = "a service imports no other service" if mine else "a shared services module imports no service"
            elif target == "bus" and path.name == "handlers.py" and mine:
                why = "a handler imports nothing of bus (its API is contracts.handling)"
        if why:
            out.append(f"{rel}:{line}: imports {module}: {why}")
    return out


def project_files() -> list[Path]:
    files = []
    for package in PACKAGES + ("bench",):
        files.extend(sorted((ROOT / package).rglob("*.py")))
    return files


def test_every_project_package_is_checked():
    names = {_module_name(p) for p in project_files()}
    for package in PACKAGES:
        assert package in names, f"{package}/ is missing or has no __init__.py"


@pytest.mark.parametrize("package", PACKAGES + ("bench",))
def test_imports_point_down_the_layers(package):
    found = [p for path in sorted((ROOT / package).rglob("*.py")) for p in problems(path)]
    assert not found, "imports that go the wrong way:\n" + "\n".join(found)


def test_the_check_names_a_wrong_import_with_file_and_line(tmp_path, monkeypatch):
    """The checker itself: a bus module importing the CLI, and a handler importing bus, are named."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "bus").mkdir()
    (tmp_path / "bus" / "x.py").write_text("import os\n\nfrom chora.settings import Settings\n")
    (tmp_path / "services" / "generator").mkdir(parents=True)
    (tmp_path / "services" / "validator").mkdir(parents=True)
    (tmp_path / "services" / "validator" / "rules.py").write_text("")
    (tmp_path / "services" / "generator" / "handlers.py").write_text(
        "from bus.consumer import Retry\nfrom services.validator import rules\nfrom services import runtime\n"
    )
    assert problems(tmp_path / "bus" / "x.py") == [
        "bus/x.py:3: imports chora.settings: nothing imports the command line package chora"
    ]
    assert problems(tmp_path / "services" / "generator" / "handlers.py") == [
        "services/generator/handlers.py:1: imports bus.consumer: a handler imports nothing of bus (its API is contracts.handling)",
        "services/generator/handlers.py:2: imports services.validator.rules: a service imports no other service",
    ]
    (tmp_path / "chora_client").mkdir()
    (tmp_path / "chora_client" / "client.py").write_text("from contracts.events import X\nfrom bus.content import Y\n")
    (tmp_path / "services" / "generator" / "service.py").write_text("from chora_client import ChoraClient\n")
    assert problems(tmp_path / "chora_client" / "client.py") == [
        "chora_client/client.py:2: imports bus.content: chora_client imports only contracts"
    ]
    assert problems(tmp_path / "services" / "generator" / "service.py") == [
        "services/generator/service.py:1: imports chora_client: only the CLI, the tests and the benchmark import "
        "chora_client (services talk over NATS)"
    ]


def test_only_the_entry_module_imports_the_cli():
    """`python -m chora` runs chora/__main__.py; were a command module to import chora.cli
    back, cli.py would load twice (once as __main__ under `python -m chora.cli`) and the
    commands would import a half-initialised module."""
    found = [
        f"{path.relative_to(ROOT).as_posix()}:{line}: imports {module}"
        for path in sorted((ROOT / "chora").rglob("*.py"))
        if path.name != "__main__.py"
        for module, line in imports_of(path)
        if module == "chora.cli" or module.startswith("chora.cli.")
    ]
    assert not found, "only chora/__main__.py imports chora.cli:\n" + "\n".join(found)
    assert ("chora.cli", 5) in imports_of(ROOT / "chora" / "__main__.py")
