"""Reading a config: YAML with `base:` files, `key.sub=value` overrides, type coercion, validation.

Every problem stops the run before a process group exists, as one line naming where the value
came from, the dotted key and what is allowed, e.g. ``configs/x.yaml: data.mask.ratio: 1.5 is
outside [0, 1)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .fields import ConfigError, Invalid
from .schema import Config, method_names, method_sections

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "defaults.yaml"


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (default: configs/defaults.yaml), apply `key.sub=value` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    source = _display(path)
    raw, origins = _read_yaml(path, source, seen=())
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("command line", item, "overrides look like key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError("command line", key, f"cannot parse value {text!r}: {e}") from None
        _set_dotted(raw, key, value)
        origins[key] = "command line"
    return build_config(raw, source, origins)


def build_config(raw: dict, source: str = "<dict>", origins: dict[str, str] | None = None) -> Config:
    """Turn a plain nested dict into a validated `Config`."""
    origins = origins or {}
    cfg = _build(Config, raw, "", source, origins)
    for prefix, section in _sections(cfg):
        if not hasattr(section, "validate"):
            continue
        try:
            section.validate()
        except Invalid as e:
            key = f"{prefix}.{e.key}" if prefix else e.key
            raise ConfigError(_origin(origins, key, source), key, e.problem) from None
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps and checkpoints; a `Config` with its
    methods' sections as top-level keys beside the others."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, Config):
        out.update({key: dataclasses.asdict(getattr(cfg, key)) for key in method_sections()})
    return _plain(out)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every leaf key with its help text and default: `launch.py --help-config` prints this."""
    rows = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            help_text = f.metadata.get("help", "")
            if cls is Config and f.name == "method":
                help_text += f" Registered: {', '.join(sorted(method_names()))}."
            rows.append((key, help_text, getattr(default, f.name)))
    if cls is Config:
        for key, section in method_sections().items():
            rows += describe(section, f"{prefix}{key}.")
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path, source: str, seen: tuple) -> tuple[dict, dict[str, str]]:
    if not path.is_file():
        raise ConfigError(source, "", "config file not found")
    if path.resolve() in seen:
        raise ConfigError(source, "base", "circular base: chain")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"top level must be a mapping, got {type(raw).__name__}")
    origins = {key: source for key in _leaf_keys(raw)}
    base = raw.pop("base", None)
    if base is None:
        return raw, origins
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    merged, base_origins = _read_yaml(base_path, _display(base_path), seen + (path.resolve(),))
    _merge(merged, raw)
    base_origins.update(origins)
    return merged, base_origins


def _leaf_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        keys += _leaf_keys(v, key + ".") if isinstance(v, dict) else [key]
    return keys


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _origin(origins: dict[str, str], key: str, default: str) -> str:
    # The exact key, else the nearest set parent (a whole section given at once), else the main file.
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default


def _sections(cfg: Any, prefix: str = ""):
    """Yield (dotted prefix, dataclass instance), innermost sections first, the root last."""
    names = [f.name for f in dataclasses.fields(cfg)] + (list(method_sections()) if isinstance(cfg, Config) else [])
    for name in names:
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{name}.")
    yield prefix.rstrip("."), cfg


def _build(cls: type, raw: Any, prefix: str, source: str, origins: dict[str, str]) -> Any:
    where = prefix.rstrip(".")
    if not isinstance(raw, dict):
        raise ConfigError(_origin(origins, where, source), where, f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    extra = method_sections() if cls is Config else {}  # the methods' own sections
    hints.update(extra)
    names += list(extra)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known keys: {', '.join(names)}"
            raise ConfigError(_origin(origins, full, source), full, f"unknown key{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, full + ".", source, origins)
        else:
            try:
                kwargs[key] = _coerce(value, typ)
            except Invalid as e:
                raise ConfigError(_origin(origins, full, source), full, e.problem) from None
    sections = {k: kwargs.pop(k) for k in extra if k in kwargs}
    built = cls(**kwargs)
    for key, section in sections.items():
        setattr(built, key, section)
    return built


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if origin is tuple:
        return f"a list of {len(typing.get_args(typ))} numbers"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(typ)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(typ, str(typ))


def _coerce(value: Any, typ: Any) -> Any:
    """Check `value` against the annotation and return it in that type, or raise Invalid."""
    origin = typing.get_origin(typ)
    bad = Invalid("", f"{value!r} is not {_type_name(typ)}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(typ):
            return "on" if value else "off"  # YAML 1.1 reads a bare off/on as false/true
        if value not in typing.get_args(typ):
            raise Invalid("", f"{value!r} is not {_type_name(typ)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _coerce(value, arg)
            except Invalid:
                continue
        raise bad
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, typing.get_args(typ)[0]) for v in value]
    if typ is type(None):
        if value is not None:
            raise bad
        return None
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if typ is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept any string float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config type {typ} not supported")  # a schema bug, not user input
