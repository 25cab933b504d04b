"""Typed configuration: frozen dataclasses loaded from YAML/dicts with ``key=value`` overrides.

Every stage has a frozen dataclass config. :func:`load_config` builds one from an optional YAML file and
command-line overrides (``train.lr=1e-4`` style dotted keys), rejecting unknown keys and wrong types with a
message naming the key. :func:`config_to_dict` gives the JSON-able dict saved beside every artifact.

Ranges, one rule for every config (:func:`check_ranges`, run by :func:`load_config`): a numeric field must be
finite (no ``nan``/``inf``) and ``>= 0`` unless it declares its own range in the field metadata,
``lr: float = field(default=1e-4, metadata=bounds(gt=0))``; a string field that becomes a lake path declares
``metadata=LAKE_NAME`` and must pass :func:`check_name`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cpldm_core.errors import UserError

T = TypeVar("T")

#: What a user-given name that becomes a path (run, VAE id, dataset) may hold.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
#: Field metadata of a string field that names a lake path (checked by :func:`check_ranges`; ``""`` = unset).
LAKE_NAME = {"lake_name": True}
#: Range of a numeric field without its own :func:`bounds`: non-negative.
DEFAULT_BOUNDS = {"ge": 0}


def check_name(value: str, what: str = "name") -> str:
    """``value`` if it is safe as one path component of the lake, else a :class:`UserError` naming ``what``.

    Letters, digits, ``.``, ``_`` and ``-`` only; no ``..`` and no leading ``.``, so a name can neither leave
    its folder (``../../x``) nor hide in it.
    """
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or ".." in value or value.startswith("."):
        raise UserError(f"{what} {value!r}: names may hold only letters, digits, '.', '_' and '-' "
                        "(no '/', no '..', not starting with '.')")
    return value


def lake_name(value: str) -> str:
    """argparse ``type=`` for options naming a lake path (``--run``, ``--vae-id``, ``--dataset``)."""
    import argparse
    try:
        return check_name(value)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bounds(ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> dict:
    """Field metadata declaring a numeric range (``ge``: >=, ``gt``: >, ``le``: <=, ``lt``: <)."""
    return {"bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def check_ranges(config: Any, prefix: str = "") -> None:
    """Raise :class:`UserError` naming the key when a field of ``config`` (nested too) is out of its range."""
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, prefix=f"{key}.")
        elif f.metadata.get("lake_name"):
            if value:
                check_name(value, f"config key '{key}':")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"config key '{key}': {value} is not a finite number")
            for op, bound in f.metadata.get("bounds", DEFAULT_BOUNDS).items():
                sign, ok = _OPS[op]
                if not ok(value, bound):
                    raise UserError(f"config key '{key}': {value} is out of range (must be {sign} {bound})")


def config_to_dict(config: Any) -> dict:
    """Nested dataclass -> plain dict (tuples become lists) for JSON/YAML."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(f"config key '{key}': {value!r} matches none of {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise UserError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return type(value)(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)) if origin is list \
            else tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config key '{key}': expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{key}': expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`UserError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"config {cls.__name__}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"config {cls.__name__}: {exc}") from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: T | None = None) -> T:
    """Config of type ``cls`` from defaults (or ``base``), then YAML ``path``, then ``overrides``.

    ``overrides`` are ``key=value`` strings (values parsed as YAML scalars, dotted keys for nested sections)
    or a dict. Errors name the offending key and file.
    """
    data: dict = config_to_dict(base) if base is not None else {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping of keys to values")
        _deep_update(data, loaded)
    if isinstance(overrides, dict):
        _deep_update(data, overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise UserError(f"override '{item}' must look like key=value")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            _set_dotted(data, key.strip(), value)
    config = from_dict(cls, data)
    check_ranges(config)
    return config


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
