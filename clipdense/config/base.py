"""Configs: pydantic models loaded from YAML, with `a.b=value` overrides and one-line errors.

Every stage config subclasses `Config` (unknown keys are errors). `load_config(Cls, path, overrides)`
is what the CLI and Python users call; any user mistake raises `ConfigError` whose message is one line
naming the file or key at fault.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from clipdense.config.errors import ConfigError


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


C = TypeVar("C", bound=BaseModel)


def _parse_value(text: str) -> Any:
    # YAML scalars: `3` -> int, `1e-3` -> float, `[1,2]` -> list, `null` -> None, `true` -> bool.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and text.lower() in {"inf", "-inf", "nan"}:
        return float(text)
    return value


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set `data["a"]["b"]["c"] = value` for key `a.b.c` in place, making missing sections (value deep-copied)."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"key {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def get_dotted(data: dict, key: str) -> Any:
    """The value at `a.b.c` in nested dicts, None where a part is missing."""
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def with_values(model: C, values: dict[str, Any], source: str = "config") -> C:
    """A copy of a validated config with dotted keys (`train.optim.lr`, by YAML name) set to `values`: each value
    is validated as it is assigned (the models validate assignment), the rest of the config is not validated
    again. A key the config lacks, or a bad value, is a one-line ConfigError naming the key."""
    out = model.model_copy(deep=True)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node: Any = out
        for part in parents:
            node = _child(node, part, key, source)
        try:
            if isinstance(node, dict):
                node[leaf] = copy.deepcopy(value)
            else:
                setattr(node, _field_name(node, leaf, key, source), copy.deepcopy(value))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"{source}: key {key!r}")) from None
    return out


def _field_name(node: Any, part: str, key: str, source: str) -> str:
    """The attribute that YAML key `part` of model `node` sets (its alias where it has one)."""
    if isinstance(node, BaseModel):
        by_name = type(node).model_config.get("validate_by_name", False)
        for name, f in type(node).model_fields.items():
            if part == f.alias or (part == name and (f.alias is None or by_name)):
                return name
    raise ConfigError(f"{source}: unknown key {key!r}")


def _child(node: Any, part: str, key: str, source: str) -> Any:
    if isinstance(node, dict):
        if not isinstance(node.get(part), dict):
            node[part] = {}
        return node[part]
    child = getattr(node, _field_name(node, part, key, source))
    if not isinstance(child, (BaseModel, dict)):
        raise ConfigError(f"{source}: key {key!r}: {part!r} is not a section")
    return child


def deep_merge(base: dict, extra: dict) -> dict:
    """A copy of `base` with `extra` merged in: sections merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, _, raw = override.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r} has an empty key")
    set_dotted(data, key, _parse_value(raw))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = f"unknown key {key!r}"
    elif kind == "missing":
        msg = f"missing required key {key!r}"
    else:
        got = first.get("input")
        got_s = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        msg = f"key {key!r}: {first['msg']} (got {got_s[:60]})"
    more = len(err.errors()) - 1
    return f"{source}: {msg}" + (f" (+{more} more errors)" if more > 0 else "")


def build_config(cls: type[C], data: dict, source: str = "config") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = ()) -> C:
    """Load `cls` from an optional YAML file plus `a.b=value` overrides."""
    data = read_yaml(path) if path else {}
    for o in overrides:
        apply_override(data, o)
    return build_config(cls, data, str(path) if path else "config")
