"""Content configs: one JSON or YAML file per id in the configs directory.

``<configs_dir>/<id>.json|.yaml|.yml`` holds a :class:`ContentConfig`. A
:class:`ConfigStore` loads them by id:

- the id is checked against ``^[a-z][a-z0-9-]*$`` (at most 128 characters)
  before any path is built from it;
- every path it reads (the config file, its ``template_file``), once symlinks
  are resolved, must lie inside the configs directory;
- a parsed config is cached under the ``(mtime_ns, size, inode)`` of its file
  (and of its template file, if any), so a cached lookup costs one ``stat``
  per file and an edited file is picked up on the next request.

Every failure is a :class:`ConfigError` whose ``code`` is stable:
``INVALID_CONFIG_ID``, ``CONFIG_NOT_FOUND``, ``CONFIG_INVALID``,
``TEMPLATE_NOT_FOUND``, ``PATH_OUTSIDE_CONFIGS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat as stat_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, field_validator, model_validator

from composition.codegen import CodeGenerationSpec

ID_PATTERN = r"^[a-z][a-z0-9-]*$"
ID_MAX_LENGTH = 128
# fullmatch, so a trailing newline never slips through as ``$`` would let it.
_ID_RE = re.compile(r"[a-z][a-z0-9-]{0,%d}" % (ID_MAX_LENGTH - 1))
EXTENSIONS = (".json", ".yaml", ".yml")
MAX_FILE_BYTES = 1 << 20  # a config or template file larger than this is refused

_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class GenerationError(Exception):
    """An expected failure of a generation: it becomes an error event, never a crash.

    ``code`` is stable (UPPER_SNAKE), ``message`` is for people.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConfigError(GenerationError):
    """A content config that cannot be loaded."""


def candidates(directory: Path, config_id: str) -> list[Path]:
    """The files ``<id>.json|.yaml|.yml`` that exist in ``directory`` (links included, unresolved)."""
    found = []
    for ext in EXTENSIONS:
        p = directory / f"{config_id}{ext}"
        try:
            p.lstat()
        except OSError:
            continue
        found.append(p)
    return found


def valid_config_id(config_id: object) -> bool:
    return isinstance(config_id, str) and _ID_RE.fullmatch(config_id) is not None


# --------------------------------------------------------------------------- the file format

_TTL_RE = re.compile(r"(\d+)\s*(s|m|h|d)?")
_TTL_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_cache(v: Any) -> int | Literal["on", "off"] | None:
    """A config's ``cache:``: a TTL (``90``, ``"30s"``, ``"15m"``, ``"1h"``, ``"2d"``) as whole
    seconds, ``"on"`` (the default TTL, also for a generator that is not deterministic),
    ``"off"``, or None (unset: on for deterministic generators only)."""
    if v is None or v == "on" or v is True:
        return None if v is None else "on"
    if v == "off" or v is False:
        return "off"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    if isinstance(v, str) and (m := _TTL_RE.fullmatch(v.strip())) and int(m.group(1)) >= 1:
        return int(m.group(1)) * _TTL_UNITS[m.group(2)]
    raise ValueError(f"must be a TTL of at least 1 s (90, '30s', '15m', '1h', '2d'), 'on' or 'off'; got {v!r}")


ConfigIdStr = Annotated[str, StringConstraints(pattern=ID_PATTERN, max_length=ID_MAX_LENGTH)]


class TelemetrySpec(BaseModel):
    """What the telemetry sink may write about the requests that name a config (content or
    artifact). By default a request's ``context`` values stay out of the JSONL (its hash and
    key names go in); ``keep_context: true`` writes the values (redacted by key name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_context: bool = False


class ContentConfig(BaseModel):
    """One content config, as written in its file. Unknown keys are refused (typos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: ConfigIdStr
    generator: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    description: str = ""
    template: str | None = None
    template_file: str | None = None
    example_output: str | None = None
    context: dict[str, Any] = {}
    output_format: Literal["markdown", "text", "json", "code"] = "markdown"
    # Rules for the validator service; kept as written, not interpreted here.
    validation: list[dict[str, Any]] = []
    # The generator's result cache (see parse_cache): a TTL, "on", "off"; unset: the generator's default.
    cache: int | Literal["on", "off"] | None = None

    @field_validator("cache", mode="before")
    @classmethod
    def _a_cache_setting(cls, v: Any) -> int | str | None:
        return parse_cache(v)

    # Settings of the code_generation generator (composition/codegen.py).
    code_generation: CodeGenerationSpec | None = None
    # What the telemetry JSONL keeps of the requests for this config (TelemetrySpec).
    telemetry: TelemetrySpec = TelemetrySpec()

    @field_validator("template_file")
    @classmethod
    def _a_file_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "\x00" in v:
            raise ValueError("must not contain a NUL byte (it cannot name a file)")
        try:
            os.fsencode(v)
        except UnicodeError:
            raise ValueError("cannot be encoded as a file name (a lone surrogate?)") from None
        return v

    @model_validator(mode="after")
    def _one_template(self) -> "ContentConfig":
        if self.template is not None and self.template_file is not None:
            raise ValueError("set either 'template' or 'template_file', not both")
        return self


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config with its template source read: what generators get.

    ``template`` is the template source (inline or read from ``template_file``),
    ``template_hash`` the sha256 hex of it (generators key compiled templates on
    ``(id, template_hash)``), ``template_name`` names it in error messages,
    ``config_hash`` the sha256 hex of the config's canonical JSON (the result cache's key).
    """

    spec: ContentConfig
    path: Path
    template: str | None = None
    template_hash: str | None = None
    template_name: str = "<inline template>"
    defaults: dict[str, Any] = field(default_factory=dict)
    config_hash: str | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def generator(self) -> str:
        return self.spec.generator

    @property
    def example_output(self) -> str | None:
        return self.spec.example_output

    @property
    def output_format(self) -> str:
        return self.spec.output_format


# --------------------------------------------------------------------------- errors made readable


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_problems(err: ValidationError, *, drop: str | None = None) -> list[str]:
    """``field: what is wrong`` for every problem (config files, validation rules); ``drop``:
    a first location part not to show (the tag of a tagged union)."""
    parts = []
    for e in err.errors(include_url=False):
        loc = tuple(e.get("loc", ()))
        if drop is not None and loc and loc[0] == drop:
            loc = loc[1:]
        kind = e.get("type", "")
        msg = e.get("msg", "invalid")
        if kind == "extra_forbidden":
            what = "unknown field (a typo?)"
        elif kind == "missing":
            what = "required field is missing"
        elif kind == "string_pattern_mismatch":
            what = f"must match {(e.get('ctx') or {}).get('pattern', ID_PATTERN)}, got {e.get('input')!r}"
        elif kind == "literal_error":
            what = f"{msg}, got {e.get('input')!r}"
        else:
            what = msg.removeprefix("Value error, ")
        where = _loc(loc)
        parts.append(f"{where}: {what}" if where else what)
    return parts


def readable_validation_error(err: ValidationError) -> str:
    """:func:`validation_problems` joined by ``; ``."""
    return "; ".join(validation_problems(err))


# --------------------------------------------------------------------------- the store


@dataclass(slots=True)
class _Entry:
    path: Path  # the config file as named in the directory (a symlink is followed by stat)
    key: tuple[int, int, int]
    config: LoadedConfig
    template_path: Path | None = None
    template_key: tuple[int, int, int] | None = None


def _key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigStore:
    """Loads content configs by id from ``configs_dir``, cached per file version."""

    def __init__(self, configs_dir: Path | str):
        self.configs_dir = Path(configs_dir)
        self.root = self.configs_dir.resolve()
        self._cache: dict[str, _Entry] = {}

    # ------------------------------------------------------------------ hot path
    def get(self, config_id: str) -> LoadedConfig:
        """The config ``config_id``; raises :class:`ConfigError`."""
        if not isinstance(config_id, str) or _ID_RE.fullmatch(config_id) is None:
            shown = repr(config_id if not isinstance(config_id, str) else config_id[:140])
            raise ConfigError(
                "INVALID_CONFIG_ID",
                f"config id {shown} must match {ID_PATTERN} and have at most {ID_MAX_LENGTH} characters",
            )
        entry = self._cache.get(config_id)
        if entry is not None:
            try:
                fresh = _key(os.stat(entry.path)) == entry.key and (
                    entry.template_path is None or _key(os.stat(entry.template_path)) == entry.template_key
                )
            except OSError:
                fresh = False
            if fresh:
                return entry.config
            del self._cache[config_id]
        entry = self._load(config_id)
        self._cache[config_id] = entry
        return entry.config

    # ------------------------------------------------------------------ listing
    def list(self) -> list[str]:
        """The ids of the config files in the directory (valid names only), sorted."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        ids = set()
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext in EXTENSIONS and _ID_RE.fullmatch(stem):
                ids.add(stem)
        return sorted(ids)

    def invalidate(self, config_id: str | None = None) -> None:
        if config_id is None:
            self._cache.clear()
        else:
            self._cache.pop(config_id, None)

    # ------------------------------------------------------------------ loading
    def _inside(self, path: Path, what: str) -> Path:
        """``path`` with symlinks resolved, or PATH_OUTSIDE_CONFIGS if it leaves the root."""
        try:
            real = path.resolve()
        except ValueError as e:  # a NUL byte, an unencodable name: it cannot name a file
            raise ConfigError("CONFIG_INVALID", f"{what} is not a valid file name: {e}") from None
        if real != self.root and not real.is_relative_to(self.root):
            raise ConfigError("PATH_OUTSIDE_CONFIGS", f"{what} resolves outside the configs directory")
        return real

    def _find(self, config_id: str) -> Path:
        found = candidates(self.root, config_id)
        if not found:
            raise ConfigError("CONFIG_NOT_FOUND", f"no content config {config_id!r} ({config_id}.json|.yaml|.yml)")
        if len(found) > 1:
            names = " and ".join(p.name for p in found)
            raise ConfigError("CONFIG_INVALID", f"config {config_id!r} is ambiguous: {names} both exist")
        return found[0]

    @staticmethod
    def _read(real: Path, st: os.stat_result, name: str, code_missing: str) -> str:
        if not stat_mod.S_ISREG(st.st_mode):
            raise ConfigError(code_missing, f"{name} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError("CONFIG_INVALID", f"{name} has {st.st_size} bytes, over the limit of {MAX_FILE_BYTES}")
        try:
            with open(real, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(code_missing, f"{name} does not exist") from None
        except OSError as e:
            raise ConfigError("CONFIG_INVALID", f"{name} cannot be read: {e.strerror or e}") from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("CONFIG_INVALID", f"{name} is not UTF-8 (byte {e.start})") from None

    def _load(self, config_id: str) -> _Entry:
        path = self._find(config_id)
        real = self._inside(path, f"config file {path.name}")
        try:
            st = os.stat(path)
        except OSError:
            raise ConfigError("CONFIG_NOT_FOUND", f"config file {path.name} is a broken link") from None
        text = self._read(real, st, path.name, "CONFIG_NOT_FOUND")
        doc = self._parse(path, text)
        try:
            spec = ContentConfig.model_validate(doc)
        except ValidationError as e:
            raise ConfigError("CONFIG_INVALID", f"{path.name}: {readable_validation_error(e)}") from None
        if spec.id != config_id:
            raise ConfigError(
                "CONFIG_INVALID", f"{path.name}: id {spec.id!r} does not match the file name (expected {config_id!r})"
            )

        template, template_name, tpath, tkey = spec.template, "<inline template>", None, None
        if spec.template_file is not None:
            template_name = spec.template_file
            rel = Path(spec.template_file)
            if rel.is_absolute():
                raise ConfigError(
                    "PATH_OUTSIDE_CONFIGS",
                    f"{path.name}: template_file {spec.template_file!r} must be relative to the configs directory",
                )
            tpath = self.root / rel
            treal = self._inside(tpath, f"{path.name}: template_file {spec.template_file!r}")
            try:
                tst = os.stat(tpath)
            except ValueError as e:
                raise ConfigError(
                    "CONFIG_INVALID", f"{path.name}: template_file {spec.template_file!r} is not a valid file name: {e}"
                ) from None
            except OSError:
                raise ConfigError(
                    "TEMPLATE_NOT_FOUND", f"{path.name}: template_file {spec.template_file!r} does not exist"
                ) from None
            template = self._read(treal, tst, f"template_file {spec.template_file!r}", "TEMPLATE_NOT_FOUND")
            tkey = _key(tst)
        thash = hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest() if template is not None else None
        loaded = LoadedConfig(
            spec=spec,
            path=path,
            template=template,
            template_hash=thash,
            template_name=template_name,
            defaults=dict(spec.context),
            config_hash=hashlib.sha256(
                json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
            ).hexdigest(),
        )
        return _Entry(path=path, key=_key(st), config=loaded, template_path=tpath, template_key=tkey)

    @staticmethod
    def _parse(path: Path, text: str) -> Any:
        try:
            if path.suffix == ".json":
                doc = json.loads(text)
            else:
                doc = yaml.load(text, Loader=_YamlLoader)
        except json.JSONDecodeError as e:
            raise ConfigError(
                "CONFIG_INVALID", f"{path.name}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError("CONFIG_INVALID", f"{path.name}: not valid YAML{where}: {problem}") from None
        if not isinstance(doc, dict):
            raise ConfigError(
                "CONFIG_INVALID", f"{path.name}: the top level must be a mapping, not {type(doc).__name__}"
            )
        return doc
