"""Artifact configs: an artifact is composed of parts, each part generated from a content config.

``<configs_dir>/artifacts/<id>.json|.yaml|.yml`` holds an :class:`ArtifactConfig`::

    id: product-docs
    description: Product documentation in one file
    context: {product: Chora}          # defaults of every part
    parts:                             # list order = order of composition
      - {id: overview, content_config_id: product-overview}
      - {id: api, content_config_id: api-endpoint-doc, required: false}
      - {id: summary, content_config_id: doc-summary, depends_on: [overview]}
    compose:
      strategy: layout                 # concat (with separator) | layout (jinja2)
      layout_file: templates/product-docs.md.j2

An :class:`ArtifactStore` loads them by id with the same guarantees as
:class:`composition.configs.ConfigStore` (whose helpers it reuses): the id is checked
against ``^[a-z][a-z0-9-]*$`` before any path is built, every file it reads
(the config, its ``layout_file``) must resolve inside the configs directory,
files are size-limited and must be UTF-8.

:func:`check_artifact` goes further, before any work is done for a request:
every ``depends_on`` names a part of the artifact, the dependencies have no
cycle (the message names it), every part's content config exists and loads.

Every failure is an :class:`ArtifactError` whose ``code`` is stable:
``INVALID_ARTIFACT_ID``, ``ARTIFACT_NOT_FOUND``, ``ARTIFACT_INVALID``,
``PATH_OUTSIDE_CONFIGS``, ``LAYOUT_NOT_FOUND``,
``UNKNOWN_DEPENDENCY``, ``DEPENDENCY_CYCLE``, ``PART_CONFIG_NOT_FOUND``,
``PART_CONFIG_INVALID`` (and, from the assembler, which compiles layouts,
``LAYOUT_INVALID``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from composition.configs import (
    EXTENSIONS,
    candidates,
    ID_MAX_LENGTH,
    ID_PATTERN,
    ConfigError,
    ConfigIdStr,
    ConfigStore,
    GenerationError,
    TelemetrySpec,
    readable_validation_error,
    valid_config_id,
)

ARTIFACTS_SUBDIR = "artifacts"
PART_ID_PATTERN = r"^[a-z][a-z0-9_-]*$"
MAX_PARTS = 200

PartIdStr = Annotated[str, StringConstraints(pattern=PART_ID_PATTERN, max_length=64)]


class ArtifactError(GenerationError):
    """An artifact config that cannot be used. ``code`` is stable, ``message`` names what is wrong."""


# --------------------------------------------------------------------------- the file format


class PartConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: PartIdStr
    content_config_id: ConfigIdStr
    context: dict[str, Any] = {}
    required: bool = True
    depends_on: list[PartIdStr] = []


class ComposeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["concat", "layout"] = "concat"
    separator: str = "\n\n"
    layout: str | None = None
    layout_file: str | None = None

    @model_validator(mode="after")
    def _layout(self) -> "ComposeConfig":
        if self.layout is not None and self.layout_file is not None:
            raise ValueError("set either 'layout' or 'layout_file', not both")
        if self.strategy == "layout" and self.layout is None and self.layout_file is None:
            raise ValueError("strategy 'layout' needs 'layout' (inline jinja2) or 'layout_file'")
        if self.strategy == "concat" and (self.layout is not None or self.layout_file is not None):
            raise ValueError("'layout'/'layout_file' only apply to strategy 'layout'")
        return self


class ArtifactConfig(BaseModel):
    """One artifact config, as written in its file. Unknown keys are refused (typos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: ConfigIdStr
    description: str = ""
    parts: Annotated[list[PartConfig], Field(min_length=1, max_length=MAX_PARTS)]
    compose: ComposeConfig = ComposeConfig()
    context: dict[str, Any] = {}
    # What the telemetry JSONL keeps of the artifact requests (TelemetrySpec).
    telemetry: TelemetrySpec = TelemetrySpec()
    # a run of this artifact must be complete this many seconds after the assembler accepts it,
    # else it ends as timed_out (a request's own deadline_s wins); none by default
    deadline_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None

    @model_validator(mode="after")
    def _unique_parts(self) -> "ArtifactConfig":
        seen: set[str] = set()
        for p in self.parts:
            if p.id in seen:
                raise ValueError(f"part id {p.id!r} is used twice")
            seen.add(p.id)
        return self


@dataclass(frozen=True, slots=True)
class LoadedArtifact:
    """A validated artifact config with its layout source read (if any)."""

    spec: ArtifactConfig
    path: Path
    layout: str | None = None  # the jinja2 layout source (inline or read from layout_file)
    layout_name: str = "<inline layout>"

    @property
    def id(self) -> str:
        return self.spec.id


# --------------------------------------------------------------------------- the dependency graph


def dependency_order(parts: list[PartConfig] | list[Any]) -> list[str]:
    """The part ids in an order where every part comes after its dependencies.

    Ties keep the list order (a stable topological sort). Raises
    ``UNKNOWN_DEPENDENCY`` for a ``depends_on`` naming no part, and
    ``DEPENDENCY_CYCLE`` naming the cycle (``a -> b -> a``), a part depending on
    itself included.
    """
    ids = [p.id for p in parts]
    known = set(ids)
    deps: dict[str, list[str]] = {}
    for p in parts:
        for d in p.depends_on:
            if d not in known:
                raise ArtifactError(
                    "UNKNOWN_DEPENDENCY", f"part {p.id!r} depends on {d!r}, which is not a part of this artifact"
                )
        deps[p.id] = list(dict.fromkeys(p.depends_on))
    cycle = find_cycle(ids, deps)
    if cycle:
        raise ArtifactError("DEPENDENCY_CYCLE", "parts depend on each other in a cycle: " + " -> ".join(cycle))
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(ids):
        for pid in ids:  # list order among the ready ones
            if pid not in done and all(d in done for d in deps[pid]):
                order.append(pid)
                done.add(pid)
                break
    return order


def find_cycle(ids: list[str], deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]``, or None. Iterative DFS (no recursion limit)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(ids, WHITE)
    for root in ids:
        if color[root] != WHITE:
            continue
        path: list[str] = [root]
        stack = [iter(deps.get(root, ()))]
        color[root] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                color[path.pop()] = BLACK
                continue
            if color[nxt] == GREY:
                return path[path.index(nxt) :] + [nxt]
            if color[nxt] == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                stack.append(iter(deps.get(nxt, ())))
    return None


# --------------------------------------------------------------------------- the store


def _remap(e: ConfigError, default: str = "ARTIFACT_INVALID") -> ArtifactError:
    code = {"CONFIG_INVALID": default, "CONFIG_NOT_FOUND": "ARTIFACT_NOT_FOUND"}.get(e.code, e.code)
    return ArtifactError(code, e.message)


class ArtifactStore:
    """Loads artifact configs by id from ``<configs_dir>/artifacts`` (no cache: they are read per request)."""

    def __init__(self, configs_dir: Path | str):
        self.configs_dir = Path(configs_dir)
        self.root = self.configs_dir.resolve()
        self.dir = self.root / ARTIFACTS_SUBDIR

    def list(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        ids = set()
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext in EXTENSIONS and valid_config_id(stem):
                ids.add(stem)
        return sorted(ids)

    def _inside(self, path: Path, root: Path, what: str) -> Path:
        real = path.resolve()
        if real != root and not real.is_relative_to(root):
            raise ArtifactError("PATH_OUTSIDE_CONFIGS", f"{what} resolves outside the configs directory")
        return real

    def get(self, artifact_id: str) -> LoadedArtifact:
        if not valid_config_id(artifact_id):
            shown = repr(artifact_id if not isinstance(artifact_id, str) else artifact_id[:140])
            raise ArtifactError(
                "INVALID_ARTIFACT_ID",
                f"artifact id {shown} must match {ID_PATTERN} and have at most {ID_MAX_LENGTH} characters",
            )
        found = candidates(self.dir, artifact_id)
        if not found:
            raise ArtifactError(
                "ARTIFACT_NOT_FOUND",
                f"no artifact config {artifact_id!r} ({ARTIFACTS_SUBDIR}/{artifact_id}.json|.yaml|.yml)",
            )
        if len(found) > 1:
            raise ArtifactError(
                "ARTIFACT_INVALID",
                f"artifact {artifact_id!r} is ambiguous: {' and '.join(p.name for p in found)} both exist",
            )
        path = found[0]
        name = f"{ARTIFACTS_SUBDIR}/{path.name}"
        real = self._inside(path, self.root, f"artifact config {name}")
        try:
            st = os.stat(path)
            text = ConfigStore._read(real, st, name, "CONFIG_NOT_FOUND")
            doc = ConfigStore._parse(path, text)
        except ConfigError as e:
            raise _remap(e) from None
        except OSError:
            raise ArtifactError("ARTIFACT_NOT_FOUND", f"artifact config {name} is a broken link") from None
        try:
            spec = ArtifactConfig.model_validate(doc)
        except ValidationError as e:
            raise ArtifactError("ARTIFACT_INVALID", f"{name}: {readable_validation_error(e)}") from None
        if spec.id != artifact_id:
            raise ArtifactError(
                "ARTIFACT_INVALID", f"{name}: id {spec.id!r} does not match the file name (expected {artifact_id!r})"
            )
        layout, layout_name = spec.compose.layout, "<inline layout>"
        if spec.compose.layout_file is not None:
            layout_name = spec.compose.layout_file
            rel = Path(spec.compose.layout_file)
            if rel.is_absolute():
                raise ArtifactError(
                    "PATH_OUTSIDE_CONFIGS",
                    f"{name}: layout_file {layout_name!r} must be relative to the configs directory",
                )
            lpath = self.root / rel
            lreal = self._inside(lpath, self.root, f"{name}: layout_file {layout_name!r}")
            try:
                lst = os.stat(lpath)
            except OSError:
                raise ArtifactError("LAYOUT_NOT_FOUND", f"{name}: layout_file {layout_name!r} does not exist") from None
            try:
                layout = ConfigStore._read(lreal, lst, f"layout_file {layout_name!r}", "TEMPLATE_NOT_FOUND")
            except ConfigError as e:
                raise ArtifactError(
                    "LAYOUT_NOT_FOUND" if e.code == "TEMPLATE_NOT_FOUND" else "ARTIFACT_INVALID", e.message
                ) from None
        return LoadedArtifact(spec=spec, path=path, layout=layout, layout_name=layout_name)


def check_artifact(loaded: LoadedArtifact, configs: ConfigStore) -> list[str]:
    """What can be checked before any work, besides the layout's syntax (the
    assembler compiles it): the dependency graph and every part's content
    config. Returns the dependency order."""
    spec = loaded.spec
    order = dependency_order(spec.parts)
    for p in spec.parts:
        try:
            configs.get(p.content_config_id)
        except ConfigError as e:
            code = (
                "PART_CONFIG_NOT_FOUND"
                if e.code in ("CONFIG_NOT_FOUND", "INVALID_CONFIG_ID")
                else "PART_CONFIG_INVALID"
            )
            raise ArtifactError(code, f"part {p.id!r}: content config {p.content_config_id!r}: {e.message}") from None
    return order


__all__ = [
    "ArtifactConfig",
    "ArtifactError",
    "ArtifactStore",
    "ComposeConfig",
    "LoadedArtifact",
    "PartConfig",
    "check_artifact",
    "dependency_order",
    "find_cycle",
]
