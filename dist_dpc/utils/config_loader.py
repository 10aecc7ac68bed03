"""Typed configuration: nested dataclasses loaded from YAML, overridden by ``a.b=value`` strings.

Unknown keys are errors (a misspelled key silently ignored is a privacy setting silently
ignored). Every error names the dotted field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and how to fix it."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(tp)[0])}" if get_args(tp) else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class YamlLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 integers: `prune.method: 2:4` must stay the string "2:4"
    (SafeLoader reads it as 124)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if not (tag == "tag:yaml.org,2002:int" and ":" in regexp.pattern)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert the harmless cases (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}={value!r} is invalid: expected {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}={value!r} is invalid: expected null")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{where}={value!r} is invalid: allowed values are {', '.join(map(repr, allowed))}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} is invalid: expected {_describe(tp)}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} is invalid: expected a mapping")
        return dict(value)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} is invalid: expected a mapping of {tp.__name__} fields")
        return build(tp, value, prefix=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}={value!r} is invalid: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r} is invalid: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}={value!r} is invalid: expected a string")
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
    section = f"'{prefix}'" if prefix else "the top level"
    return ConfigError(f"unknown config key '{full}'{hint}; allowed keys in {section}: {', '.join(names)}")


def build(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a plain mapping, recursively and strictly."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    field_names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        if key not in field_names:
            raise _unknown_key_error(cls, key, prefix)
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # __post_init__ checks
        raise ConfigError(str(exc)) from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    value = yaml.load(raw, Loader=YamlLoader) if raw.strip() != "" else None
    if isinstance(value, dict):
        glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
        if glued:  # YAML reads {teacher:0.5} as the key 'teacher:0.5' with no value
            fixed = raw.replace(glued[0], glued[0].replace(":", ": ", 1))
            raise ConfigError(f"override {text!r}: {glued[0]!r} is read as one key without a value; in a YAML "
                              f"mapping put a space after each colon, e.g. {key}={fixed.strip()}")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with path.open() as fh:
        try:
            data = yaml.load(fh, Loader=YamlLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Any:
    """YAML file (optional) -> overrides -> typed, validated ``cls``."""
    data = _deep_copy(base or {})
    if path is not None:
        data = _merge(data, read_yaml(path))
    data = apply_overrides(data, overrides or [])
    return build(cls, data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Written to a temporary file and renamed: a reader sees the old file or the new one, never part."""
    from dist_dpc.utils.atomic import atomic_write

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (a string literal right under a field) for ``--help`` output; a subclass's
    own docstring of a field wins over its base's."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, doc) for every leaf field, for help texts."""
    rows = []
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe_fields(tp, name))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((name, _describe(tp), default, docs.get(f.name, "")))
    return rows
