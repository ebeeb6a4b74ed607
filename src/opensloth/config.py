"""One config mechanism: dataclass fields -> command-line flags and YAML sections, one overlay rule.

A settings class is a frozen dataclass whose fields carry their help text
(``setting(default, "help ...")``); validation lives in its ``__post_init__``.
From such classes this module builds everything a script needs:

- :func:`add_flags`: one ``--<prefix><field>`` flag per field, typed by the
  field's annotation, with the help text and the default in the help. Flags
  default to "not given" (``argparse.SUPPRESS``), so a YAML value survives
  unless a flag overrides it.
- :func:`load_yaml` + :func:`build`: a YAML mapping onto the dataclass. Values
  are converted to the field's type: PyYAML reads ``5e-7`` (no dot) as the
  string ``'5e-7'``, which becomes the float ``5e-7``; ``'abc'`` for a float
  field, or an unknown key, is a :class:`~opensloth.errors.UserInputError`
  naming the file and the key (and listing the known keys).
- :class:`Section` + :func:`resolve`: a YAML file with optional sections
  (``dynamic_beta:``, ``rollout:``, ...) mapped onto several dataclasses, and
  the one overlay rule ``defaults < YAML < flags``.

Used by SFT (``train_configurable.py``), DPO (``train_dpo.py``), rollouts
(``train_scripts/rollout.py``) and the OaK-DPO loop (``run_oak_dpo.py``)::

    SECTIONS = (Section(None, DPORunSettings), Section("dynamic_beta", DynamicBetaConfig))
    parser = argparse.ArgumentParser()
    add_config_flags(parser, SECTIONS)             # --config, --max_steps, --dynamic_beta.alpha, ...
    settings, dynamic = resolve(parser.parse_args(argv), SECTIONS)

Only the standard library (and PyYAML, when a file is read) is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from opensloth.errors import UserInputError, same_on_every_rank

__all__ = [
    "ArgumentParser",
    "Section",
    "add_config_flags",
    "add_flags",
    "build",
    "coerce",
    "flag_values",
    "load_yaml",
    "resolve",
    "section_values",
    "setting",
]

_NOT_GIVEN = argparse.SUPPRESS


def setting(default: Any, help: str, *, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values), for flags and YAML alike.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class S:
    ...     lr: float = setting(1e-4, "peak learning rate")
    >>> S().lr
    0.0001
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) as the default of a settings field")
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class _FieldType:
    base: type  # bool, int, float, str, or the element type of a tuple
    optional: bool
    sequence: bool  # tuple[X, ...]


def _field_types(cls) -> dict[str, _FieldType]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        out[f.name] = _parse_type(hints[f.name], f"{cls.__name__}.{f.name}")
    return out


def _parse_type(tp, what: str) -> _FieldType:
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"{what}: only X or X | None annotations are supported, got {tp}")
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(set(args)) != 1 or args[0] not in (bool, int, float, str):
            raise TypeError(f"{what}: sequences must be tuple[X, ...] of bool/int/float/str, got {tp}")
        return _FieldType(args[0], optional, True)
    if tp not in (bool, int, float, str):
        raise TypeError(f"{what}: unsupported settings type {tp}; use bool, int, float, str, tuple or X | None")
    return _FieldType(tp, optional, False)


def _scalar(value: Any, base: type, where: str) -> Any:
    """``value`` as ``base``; raises UserInputError naming ``where``."""
    if base is bool:
        if isinstance(value, bool):
            return value
        raise UserInputError(f"{where}: {value!r} is not true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise UserInputError(f"{where}: {value!r} is not an integer")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 5e-7 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                number = None
            if number is not None and not math.isnan(number):
                return number
        raise UserInputError(f"{where}: {value!r} is not a number")
    if isinstance(value, str):
        return value
    raise UserInputError(f"{where}: {value!r} is not a string; quote it")


def coerce(cls, name: str, value: Any, where: str) -> Any:
    """Convert one YAML value to the type of field ``name`` of ``cls``.

    Raises:
        UserInputError: the value does not fit the type or the field's choices;
            the message starts with ``where`` (file and key).
    """
    ftype = _field_types(cls)[name]
    if value is None:
        if ftype.optional:
            return None
        raise UserInputError(f"{where}: a value is required (got null)")
    if ftype.sequence:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise UserInputError(f"{where}: {value!r} must be a non-empty list")
        out = tuple(_scalar(v, ftype.base, f"{where}[{i}]") for i, v in enumerate(items))
    else:
        out = _scalar(value, ftype.base, where)
    choices = next(f for f in fields(cls) if f.name == name).metadata.get("choices")
    if choices is not None and out not in choices:
        raise UserInputError(f"{where}: {out!r} is not one of {list(choices)}")
    return out


def build(cls, values: Mapping[str, Any], where: str):
    """``cls(**values)`` with typed values; unknown keys and invalid values are one-line errors.

    Args:
        cls: a settings dataclass.
        values: field name -> value (from YAML and/or flags).
        where: names the source in messages, e.g. ``"run.yaml: dynamic_beta"``.

    Raises:
        UserInputError: an unknown key (the message lists the known ones), a
            value of the wrong type, or a value the class's ``__post_init__``
            rejects (its message, prefixed with ``where``).
    """
    if not isinstance(values, Mapping):
        raise UserInputError(f"{where} must be a mapping of settings, got {type(values).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserInputError(f"unknown keys {unknown} in {where}; known: {sorted(known)}")
    typed = {k: coerce(cls, k, v, f"{where}: {k}") for k, v in values.items()}
    try:
        return cls(**typed)
    except UserInputError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- flags


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line: a bad flag raises :class:`UserInputError`.

    Abbreviated flags are refused (``allow_abbrev=False``): a typo must not
    silently set a neighbouring flag.

    argparse itself prints the usage and the error (two lines) and exits;
    here the error reaches :func:`opensloth.errors.run_cli`, which prints one
    line (on rank 0 only under torchrun: every rank parses the same flags).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a mistyped --max_seq_len must not pass for --max_seq_length
        super().__init__(*args, **kwargs)

    def error(self, message):
        exc = UserInputError(f"{message} (see {self.prog} --help)")
        exc.every_rank = True
        raise exc


def _dest(prefix: str, name: str) -> str:
    return prefix.replace(".", "__") + name


def add_flags(parser, cls, prefix: str = "", aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add one ``--<prefix><field>`` flag per field of ``cls`` to ``parser``.

    bool fields with a False default are switches (``--no_patches``); other
    fields take a value converted to the field's type (``tuple[str, ...]``
    takes several). Every flag defaults to "not given", so :func:`flag_values`
    returns only what the command line set. ``aliases`` maps a field name to
    extra option strings for the same flag (``{"samples": ["--samples"]}``).
    """
    aliases = aliases or {}
    types_ = _field_types(cls)
    for f in fields(cls):
        ftype = types_[f.name]
        options = [f"--{prefix}{f.name}", *aliases.get(f.name, ())]
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = list(default) if isinstance(default, tuple) else default
        help_text = (f.metadata.get("help", "") + f" (default: {shown})").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": _dest(prefix, f.name), "default": _NOT_GIVEN, "help": help_text}
        if ftype.base is bool and not ftype.sequence:
            kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
            parser.add_argument(*options, **kwargs)
            continue
        kwargs["metavar"] = f.name.upper()
        kwargs["type"] = ftype.base
        if ftype.sequence:
            kwargs["nargs"] = "+"
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(*options, **kwargs)


def flag_values(given: Mapping[str, Any] | argparse.Namespace, cls, prefix: str = "") -> dict:
    """The fields of ``cls`` that were given on the command line (tuples for list flags)."""
    given = vars(given) if isinstance(given, argparse.Namespace) else given
    out = {}
    for f in fields(cls):
        dest = _dest(prefix, f.name)
        if dest in given:
            value = given[dest]
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


# --------------------------------------------------------------------------- YAML + sections


def load_yaml(path: str) -> dict:
    """Read a YAML config file holding a mapping.

    Raises:
        UserInputError: the file is missing, is not valid YAML (the message
            gives the line), or does not hold a mapping.
    """
    import yaml

    if not os.path.isfile(path):
        raise UserInputError(f"--config {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserInputError(f"{path}:{line} is not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"--config {path!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Section:
    """One dataclass of a config file.

    Attributes:
        name: its YAML key (``"dynamic_beta"``), or None for the keys at the top level.
        cls: the settings dataclass.
        flag_prefix: prefix of its flags; default ``"<name>."`` (``--dynamic_beta.alpha``),
            ``""`` for the top level.
        aliases: extra option strings per field (see :func:`add_flags`).
    """

    name: str | None
    cls: type
    flag_prefix: str | None = None
    aliases: Mapping[str, Sequence[str]] | None = None

    @property
    def prefix(self) -> str:
        if self.flag_prefix is not None:
            return self.flag_prefix
        return "" if self.name is None else f"{self.name}."


def add_config_flags(parser, sections: Sequence[Section], *, config_help: str | None = None) -> None:
    """``--config`` plus the flags of every section (see :func:`add_flags`)."""
    named = [s.name for s in sections if s.name]
    default_help = "YAML file with these settings" + (
        f" (sections: {', '.join(n + ':' for n in named)})" if named else "") + "; flags override it"
    parser.add_argument("--config", default=None, help=(config_help or default_help).replace("%", "%%"))
    parser.add_argument("--debug", action="store_true", default=_NOT_GIVEN,
                        help="print the Python traceback above an error line (same as OPENSLOTH_DEBUG=1)")
    for section in sections:
        add_flags(parser, section.cls, section.prefix, section.aliases)


def section_values(config_path: str | None, given, sections: Sequence[Section], *,
                   ignore_other_keys: bool = False, yaml_values: Mapping[str, Any] | None = None) -> list[dict]:
    """Per section, the raw values of ``defaults < YAML < flags`` (defaults are the dataclass's own).

    Args:
        config_path: the YAML file, or None.
        given: the parsed flags (argparse namespace or its ``vars``).
        sections: at most one with ``name=None`` (the top-level keys).
        ignore_other_keys: leave YAML keys that belong to no section alone
            (a script that reads one section of a shared file); otherwise
            they are an error listing the known keys and sections.
        yaml_values: the file's mapping when the caller already read (and
            translated) it, e.g. a config written for another project; the
            file is then not read again.

    Returns:
        One dict per section (YAML values typed, flags as parsed).

    Raises:
        UserInputError: unknown keys, a section that is not a mapping, or a
            value of the wrong type; messages name the file and the key.
    """
    if yaml_values is None:
        yaml_values = load_yaml(config_path) if config_path else {}
    where = config_path or "the command line"
    names = {s.name for s in sections if s.name}
    top = next((s for s in sections if s.name is None), None)
    out = []
    for section in sections:
        known = {f.name for f in fields(section.cls)}
        if section.name is None:
            raw = {k: v for k, v in yaml_values.items() if k not in names}
            unknown = sorted(set(raw) - known)
            if unknown and not ignore_other_keys:
                extra = f" and the sections {sorted(n + ':' for n in names)}" if names else ""
                raise UserInputError(f"unknown keys {unknown} in {where}; known: {sorted(known)}{extra}")
            raw = {k: v for k, v in raw.items() if k in known}
            key_prefix = ""
        else:
            raw = yaml_values.get(section.name)
            raw = {} if raw is None else raw
            if not isinstance(raw, dict):
                raise UserInputError(f"'{section.name}:' of {where} must be a mapping, got {type(raw).__name__}")
            unknown = sorted(set(raw) - known)
            if unknown:
                raise UserInputError(f"unknown keys {unknown} in '{section.name}:' of {where}; known: {sorted(known)}")
            key_prefix = f"{section.name}."
        typed = {k: coerce(section.cls, k, v, f"{where}: {key_prefix}{k}") for k, v in raw.items()}
        out.append({**typed, **flag_values(given, section.cls, section.prefix)})
    if top is None and not ignore_other_keys:
        unknown = sorted(set(yaml_values) - names)
        if unknown:
            raise UserInputError(f"unknown keys {unknown} in {where}; known sections: {sorted(names)}")
    return out


def resolve(given, sections: Sequence[Section], *, config_path: str | None = None,
            ignore_other_keys: bool = False, yaml_values: Mapping[str, Any] | None = None) -> list:
    """The settings objects of ``sections``, in order: ``defaults < YAML (--config) < flags``.

    ``config_path`` defaults to ``given.config`` (the ``--config`` flag);
    ``yaml_values`` replaces reading it (see :func:`section_values`).

    Raises:
        UserInputError: see :func:`section_values` and :func:`build`; marked
            as raised by every rank alike (the same flags and file on each).
    """
    values = vars(given) if isinstance(given, argparse.Namespace) else dict(given)
    path = config_path if config_path is not None else values.get("config")
    where = path or "the command line"
    with same_on_every_rank():
        merged = section_values(path, values, sections, ignore_other_keys=ignore_other_keys,
                                yaml_values=yaml_values)
        return [build(s.cls, v, where if s.name is None else f"'{s.name}:' of {where}")
                for s, v in zip(sections, merged)]
