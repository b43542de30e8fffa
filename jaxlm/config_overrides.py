"""String overrides and dict round trips of a Config.

`apply_overrides` parses `section.field=value` strings (absl `--set`) against the field types
and validates the result; `to_dict` / `from_dict` store and rebuild a config (e.g. in a
checkpoint). Every error is a ConfigError whose message starts with the dotted field name.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Sequence

from jaxlm.config_run import Config, ConfigError
from jaxlm.config_validate import field_types, validate


def _parse_value(text: str, tp, key: str):
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if text.lower() in ("none", "null") and len(args) < len(typing.get_args(tp)):
      return None
    return _parse_value(text, args[0], key)
  if origin is tuple:
    (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
    items = [t.strip() for t in text.split(",") if t.strip()]
    return tuple(_parse_value(t, elem, key) for t in items)
  if tp is bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
  if tp is int:
    try:
      return int(text.replace("_", ""), 0)
    except ValueError:
      try:  # allow 1e3 style when exact
        f = float(text)
      except ValueError:
        f = math.nan
      if math.isfinite(f) and f == int(f):
        return int(f)
      raise ConfigError(f"{key}={text!r}: expected an integer") from None
  if tp is float:
    try:
      v = float(text)
    except ValueError:
      raise ConfigError(f"{key}={text!r}: expected a number") from None
    if not math.isfinite(v):
      raise ConfigError(f"{key}={text!r}: must be finite")
    return v
  if tp is str:
    return text
  raise ConfigError(f"{key}: cannot override fields of type {tp}")


def _set_path(obj, path: Sequence[str], text: str, full_key: str):
  types_ = field_types(type(obj))
  name = path[0]
  if name not in types_:
    where = full_key.rsplit(".", len(path))[0] if len(path) < full_key.count(".") + 1 else ""
    prefix = f"{where}." if where else ""
    raise ConfigError(
        f"{full_key}: unknown key {prefix}{name}; valid keys: {', '.join(prefix + k for k in types_)}")
  tp = types_[name]
  if dataclasses.is_dataclass(tp):
    if len(path) == 1:
      raise ConfigError(f"{full_key}: is a section; set one of its fields, e.g. {full_key}.<field>=…")
    value = _set_path(getattr(obj, name), path[1:], text, full_key)
  else:
    if len(path) > 1:
      raise ConfigError(f"{full_key}: {name} has no sub-fields")
    value = _parse_value(text, tp, full_key)
  return dataclasses.replace(obj, **{name: value})


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
  """Apply `section.field=value` strings in order, then validate."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected the form section.field=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
      raise ConfigError(f"override {item!r}: {key!r} is not a dotted field name")
    cfg = _set_path(cfg, key.split("."), text.strip(), key)
  validate(cfg)
  return cfg


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(d: dict, cls=Config):
  """Rebuild a config from `to_dict` output (e.g. a checkpoint's stored config)."""
  kwargs = {}
  types_ = field_types(cls)
  for k, v in d.items():
    if k not in types_:
      raise ConfigError(f"{cls.__name__}: unknown key {k!r} in stored config")
    tp = types_[k]
    if dataclasses.is_dataclass(tp):
      kwargs[k] = from_dict(v, tp)
    elif typing.get_origin(tp) is tuple:
      kwargs[k] = tuple(v)
    else:
      kwargs[k] = v
  return cls(**kwargs)
