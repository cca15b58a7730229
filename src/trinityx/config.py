"""Configs are typed dataclasses; a YAML file is a saved invocation of the same fields (nested as the dataclass is)."""

import dataclasses
import types
import typing
from pathlib import Path

import tyro
import yaml

from trinityx.errors import TrinityXError


def from_dict(cls, values: dict, where: str):
    """Build dataclass `cls` from a (YAML) dict; unknown keys are errors that name the key and the file."""
    if not isinstance(values, dict):
        raise TrinityXError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = {name: _unannotated(hint) for name, hint in typing.get_type_hints(cls).items()}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            owners = [name for name, hint in hints.items()
                      if dataclasses.is_dataclass(hint) and key in {f.name for f in dataclasses.fields(hint)}]
            if owners:
                raise TrinityXError(f"{where}: {key!r} belongs under {owners[0]!r}: write it as "
                                    f"`{owners[0]}: {{{key}: ...}}`")
            raise TrinityXError(f"{where}: unknown key {key!r}; {cls.__name__} has {sorted(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}: {key}")
        else:
            value = _typed(value, hint, f"{where}: {key}")
        kwargs[key] = value
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return cls(**kwargs, **{n: tyro.MISSING for n in missing})


def _unannotated(hint):
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _typed(value, hint, where: str):
    """`value` as a field of type `hint` holds it (YAML lists become tuples), or an error naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _typed(value, arm, where)
            except TrinityXError:
                pass
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) == len(value):
            return tuple(_typed(v, arm, f"{where}[{i}]") for i, (v, arm) in enumerate(zip(value, arms)))
    elif origin is list and isinstance(value, list):
        return [_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {_typed(k, args[0], where): _typed(v, args[1], f"{where}: {k}") for k, v in value.items()}
    elif hint is type(None):
        if value is None:
            return value
    elif hint is bool or hint is str:
        if isinstance(value, hint):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is Path:
        if isinstance(value, str):
            return Path(value)
    else:
        return value  # a type this check does not know: the dataclass takes it as it is
    raise TrinityXError(f"{where}: {value!r} is not a valid {_type_name(hint)}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "choice (one of " + ", ".join(map(repr, typing.get_args(hint))) + ")"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TrinityXError(f"--config {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrinityXError(f"--config {path} is not valid YAML: {e}") from None
    return values


def parse(cls, args: list[str], prog: str):
    """Parse `args` into `cls`; `--config FILE` (anywhere) supplies defaults that flags override."""
    default = None
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise TrinityXError("--config needs a file name")
        path = args[i + 1]
        args = args[:i] + args[i + 2:]
        default = from_dict(cls, load_yaml(path), str(path))
    dicts = {f.name: getattr(default, f.name) for f in dataclasses.fields(cls)
             if isinstance(getattr(default, f.name), dict) and getattr(default, f.name)} if default is not None else {}
    if not dicts:
        return tyro.cli(cls, args=args, default=default, prog=prog, description=cls.__doc__)
    # tyro turns a dict default into one flag per key (`--expert-steps.honest`), so the file's keys would be the
    # only ones a flag could set. A dict field is parsed from an empty default instead, a variable-length
    # `--expert-steps honest 20 harmless 40` as without a file, and keeps the file's value unless the flag is given.
    parsed = tyro.cli(cls, args=args, default=dataclasses.replace(default, **{name: {} for name in dicts}), prog=prog,
                      description=cls.__doc__)
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in args if a.startswith("--")}
    return dataclasses.replace(parsed, **{name: value for name, value in dicts.items() if name not in given})
