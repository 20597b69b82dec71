"""Reading our YAML files (run configs, cluster files) into the frozen dataclasses of ``schema``.

Every error a user can make in a config file is caught here, before any model, data or process group
exists, and all of them at once: each line names the file, the line (when the key came from a file), the
key, and what is allowed. The rest of the code can then trust its config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from distsft.config.aliases import Renamed, set_dotted
from distsft.config.aliases import apply as apply_aliases
from distsft.config.schema import DEMO_CONFIG, Config, combination_problems
from distsft.config.secrets import looks_secret
from distsft.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (the bundled demo config when None), apply ``key=value`` overrides, validate."""

    def own_output_dir(raw: dict[str, Any]) -> None:  # never the demo's runs/demo: a run of one's own
        if path is not None:
            raw.setdefault("output_dir", f"runs/{Path(path).stem}")

    return load_typed(
        Config,
        path if path is not None else DEMO_CONFIG,
        overrides,
        combined=combination_problems,
        aliases=True,
        fill=own_output_dir,
    )


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", c) with YAML typing, so ``1e-5`` is a float and ``[a, b]`` a list."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=1e-5")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def build_config(raw: dict[str, Any], source: str = "<dict>", lines: dict[str, int | None] | None = None) -> Config:
    """A config from an already parsed mapping (what workers receive); the field checks apply, the checks
    of combinations (which may look at files on the driver's machine) do not."""
    return build_typed(Config, raw, source, lines or {})


def build_typed(cls: type, raw: Any, source: str, lines: dict[str, int | None]) -> Any:
    problems: list[str] = []
    obj = _build(cls, raw, "", source, lines, problems)
    _raise_all(problems)
    return obj


def load_typed(
    cls: type,
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    combined: typing.Callable[[Any], list[tuple[str, str]]] | None = None,
    aliases: bool = False,
    fill: typing.Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Load any of our YAML files (run configs, cluster files) into the frozen dataclass ``cls``;
    ``combined(obj)`` lists the keys whose values do not fit with the others, and why. With ``aliases``
    the names other trainers use are read as ours, each said once on stderr (``aliases.py``); ``fill``
    sets defaults that depend on the file. Every problem of the file is reported at once, one line each."""
    raw, lines = _read_yaml(Path(path))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        lines[key] = None
    renamed = Renamed([], [])
    if aliases:
        renamed = apply_aliases(raw, _keys_by_section(cls), lambda key: _where(str(path), lines, key), lines)
    if fill is not None:  # defaults that depend on the file (after the aliases: output_dir has none)
        fill(raw)
    problems: list[str] = list(renamed.problems)
    obj = _build(cls, raw, "", str(path), lines, problems)
    if not problems and combined is not None:
        problems = [f"{_where(str(path), lines, key)}: {key}: {why}" for key, why in combined(obj)]
    _raise_all(problems)
    for notice in renamed.notices:
        print(f"config: {notice}", file=sys.stderr)
    return obj


def _keys_by_section(cls: type) -> dict[str, set[str]]:
    """The keys of ``cls`` (""), and of each of its sections."""
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    out = {"": {f.name for f in fields}}
    for f in fields:
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = {g.name for g in dataclasses.fields(hints[f.name])}
    return out


def _raise_all(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


# --- internals -----------------------------------------------------------------------------------------
MAX_NODES = 100_000
"""Values a config file may hold once its aliases are expanded (a real one holds a few hundred)."""


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int | None]]:
    """safe_load the file, and remember the line of every key so errors can point at it."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#x})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
    lines: dict[str, int | None] = {}
    visits = [0]

    def walk(n: yaml.Node, prefix: str) -> None:
        """Every key's line; duplicate keys refused (YAML would keep the last silently); nodes counted with
        aliases expanded, so a file of nested aliases (a 'billion laughs') is refused, not expanded."""
        visits[0] += 1
        if visits[0] > MAX_NODES:
            raise ConfigError(f"{path}: more than {MAX_NODES} values once its aliases are expanded; refused")
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                line = k.start_mark.line + 1
                if k.value in seen and k.value != "<<":
                    raise ConfigError(f"{path}:{line}: duplicate key {prefix}{k.value} (first at line {seen[k.value]})")
                seen[k.value] = line
                key = f"{prefix}{k.value}"
                lines.setdefault(key, line)
                walk(v, key + ".")
        elif isinstance(n, yaml.SequenceNode):
            for v in n.value:
                walk(v, prefix)

    walk(node, "")
    data = yaml.safe_load(text)
    return data, lines


def _where(source: str, lines: dict[str, int | None], key: str) -> str:
    line = lines.get(key)
    if line is None and key in lines:
        return "--set"
    return f"{source}:{line}" if line else source


def _build(cls: type, raw: Any, prefix: str, source: str, lines: dict[str, int | None], problems: list[str]) -> Any:
    """``cls`` from ``raw``; what is wrong goes to ``problems`` (a bad key keeps its default meanwhile, so the
    other keys are still checked)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{_where(source, lines, prefix.rstrip('.'))}: {prefix.rstrip('.')} must be a mapping")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        where = _where(source, lines, dotted)
        if key not in fields:
            valid = [f"{prefix}{n}" for n in fields]
            near = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else f"; valid keys here: {', '.join(valid)}"
            problems.append(f"{where}: unknown key {dotted!r}{hint}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted + ".", source, lines, problems)
            continue
        if typing.get_origin(hint) is dict and isinstance(value, dict):
            kwargs[key] = _build_mapping(hint, value, dotted, source, lines, problems)
            continue
        try:
            coerced = _coerce(value, hint)
        except ValueError as e:
            problems.append(f"{where}: {dotted}{_shown(dotted, value)} is invalid: {e}")
            continue
        check = fields[key].metadata.get("check")
        if check and not check[0](coerced):
            problems.append(f"{where}: {dotted}{_shown(dotted, value)} is out of range; allowed: {check[1]}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _build_mapping(
    tp: Any, raw: dict[Any, Any], dotted: str, source: str, lines: dict[str, int | None], problems: list[str]
) -> dict[Any, Any]:
    """A mapping checked entry by entry, each problem naming its entry and line but never a value (an
    ``env`` holds tokens). Numbers are taken as strings where strings are wanted: an environment's
    ``NCCL_IB_DISABLE: 1`` means "1"."""
    key_tp, val_tp = typing.get_args(tp)
    out = {}
    for k, v in raw.items():
        entry = f"{dotted}.{k}"
        if val_tp is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        try:
            out[_coerce(k, key_tp)] = _coerce(v, val_tp)
        except ValueError as e:
            hint = " (quote it: 'true' or '1')" if isinstance(v, bool) and val_tp is str else ""
            problems.append(f"{_where(source, lines, entry)}: {entry} is invalid: {e}{hint}")
    return out


def _shown(dotted: str, value: Any) -> str:
    """`` = value`` for an error line, or nothing where the value may be a secret: a key whose name says
    so, or a mapping (which may hold one)."""
    if isinstance(value, dict) or looks_secret(dotted.rsplit(".", 1)[-1]):
        return ""
    text = repr(value)
    return f" = {text if len(text) <= 80 else text[:77] + '...'}"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (" + ", ".join(f.name for f in dataclasses.fields(tp)) + ")"
    if tp is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` against the field's annotation, converting only where no meaning is lost."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"expected {_describe(tp)}{extra}")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp)
    if dataclasses.is_dataclass(tp):
        return _coerce_dataclass(value, tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"expected {_describe(tp)}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, item))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        return out
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError("expected a mapping")
        return {_coerce(k, key_tp): _coerce(v, val_tp) for k, v in value.items()}
    if tp is Any:
        return value
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ValueError(f"expected a list of {len(items)} values")
        return tuple(_coerce(v, t) for v, t in zip(value, items, strict=True))
    return _coerce_scalar(value, tp)


def _coerce_union(value: Any, tp: Any) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    specific = None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg)
        except ValueError as e:
            # Keep the detailed reason of the branch whose shape the value has (a list, a mapping).
            shaped = (isinstance(value, list) and typing.get_origin(arg) is list) or (
                isinstance(value, dict) and dataclasses.is_dataclass(arg)
            )
            specific = e if shaped else specific
    if specific is not None:
        raise specific
    raise ValueError(f"expected {_describe(tp)}")


def _coerce_dataclass(value: Any, tp: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}")
    problems: list[str] = []
    try:
        built = _build(tp, value, "", "", {}, problems)
    except TypeError:
        missing = [
            f.name
            for f in dataclasses.fields(tp)
            if f.name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        raise ValueError(f"missing key(s): {', '.join(missing)}") from None
    if problems:
        raise ValueError(problems[0].lstrip(": "))
    return built


def _coerce_scalar(value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError("expected an integer")
    if tp is float:  # inf and nan (YAML's .inf, .nan) mean nothing for any key: a run on them diverges
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ValueError("expected a finite number" if number is not None else "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("expected a string")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError("expected null")
    raise ValueError(f"unsupported type {tp}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``train.lr``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
