"""Command-line flags derived from a config dataclass's fields, and the dataclass back from the parsed
arguments: each setting has one default, the field's, and one help text, the field's metadata.

    @dataclass
    class SFTConfig:
        seq_len: int = setting(2048, "tokens per packed row")  # = field(default=2048, metadata={"help": ...})
        precision: str = setting("auto", "fp32 | bf16 | auto", choices=("auto", "fp32", "bf16"))

    add_fields(parser, SFTConfig, rename={"seq_len": "--row-len"}, exclude=("keep",))
    cfg = from_args(SFTConfig, parser.parse_args(argv), exclude=("keep",))

The flag of field `seq_len` is `--seq-len` (or `rename[name]`: a flag, or a tuple of the flag and
its aliases) and its dest is the field name. Types
come from the annotation: int, float, str, `X | None` (type X, default None), `list[X]` (a repeatable
flag that appends), and bool: `--name` and `--no-name` when the default is False (the second turns off a value
a resumed run kept), `--no-name` alone when it is True (a renamed bool: its flags only, store_true).
Metadata keys, all optional: "help"; "choices"; "metavar"; "cli_default", the command line's own value
when the flag is not given, for a setting the CLI derives from other arguments when left unset (the
run directory from the preset's name, a parallel degree from the world size); its help says how.
The help gets "(default: X)" appended unless it mentions its default itself; a bool that defaults
to True describes its `--no-` flag.

A small explicit helper (STYLE rule 2): it reads only the fields it is given, registers nothing, and
knows nothing of the verbs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

_MISSING = dataclasses.MISSING


def setting(default=_MISSING, help: str = "", *, factory=_MISSING, **meta) -> dataclasses.Field:
    """`dataclasses.field(default=..., metadata={"help": help, **meta})` in one call; `factory` for a
    default_factory (lists, values read from the environment)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **meta})


def selected_fields(cls, only=None, exclude=()) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` named in `only` (all when None) and not in `exclude`."""
    names = [f.name for f in dataclasses.fields(cls)]
    for n in [*(only or ()), *exclude]:
        if n not in names:
            raise ValueError(f"{cls.__name__} has no field {n!r} (fields: {', '.join(names)})")
    return [f for f in dataclasses.fields(cls) if (only is None or f.name in only) and f.name not in exclude]


def flag_names(f: dataclasses.Field, rename: dict[str, str | tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """(`--seq-len`,) for `seq_len`; (`--no-progress`,) for a bool that defaults to True; or `rename[name]`:
    one flag, or a tuple of the flag and its aliases (an older name that keeps working)."""
    if rename and f.name in rename:
        r = rename[f.name]
        return (r,) if isinstance(r, str) else tuple(r)
    stem = f.name.replace("_", "-")
    return (f"--no-{stem}" if field_default(f) is True else f"--{stem}",)


def field_default(f: dataclasses.Field):
    """The field's library default (a fresh default_factory() value)."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default: a command-line flag needs one")


def cli_default(f: dataclasses.Field):
    """What the parser gives when the flag is absent: the field's default, or its documented
    "cli_default" (a value the CLI resolves from other arguments)."""
    return f.metadata["cli_default"] if "cli_default" in f.metadata else field_default(f)


def _kind(cls, name: str, annotation) -> tuple[type, bool]:
    """(element type, is a list) of an annotation; `X | None` -> X."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return _kind(cls, name, rest[0])
    elif origin is list and len(args) == 1 and args[0] in (int, float, str):
        return args[0], True
    elif annotation in (int, float, str, bool):
        return annotation, False
    raise TypeError(f"{cls.__name__}.{name}: no command-line form for the type {annotation!r} "
                    f"(int, float, str, bool, X | None, list[X] are supported); exclude the field")


def add_fields(parser, cls, *, only=None, exclude=(), rename: dict[str, str | tuple[str, ...]] | None = None) -> None:
    """Add one flag per selected field of dataclass `cls` to `parser` (a parser or argument group)."""
    hints = typing.get_type_hints(cls)
    selected_fields(cls, only=list(rename or ()))  # every renamed field exists
    for f in selected_fields(cls, only, exclude):
        typ, many = _kind(cls, f.name, hints[f.name])
        default = cli_default(f)
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if not (typ is bool or many or "default" in help_):  # a help that says its default keeps its words
            help_ = f"{help_} (default: %(default)s)" if help_ else "default: %(default)s"
        kw = dict(dest=f.name, default=default, help=help_ or None)
        flags = flag_names(f, rename)
        if typ is bool:
            if default or len(flags) > 1 or not flags[0].startswith("--"):
                parser.add_argument(*flags, action="store_false" if default else "store_true", **kw)
            else:  # --compile and --no-compile: a setting a resumed run keeps can be turned off again
                parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        kw.update(type=typ, action="append" if many else "store")
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        else:  # named after the (first) flag, not the field: --out OUT
            kw["metavar"] = f.metadata.get("metavar", flags[0].lstrip("-").replace("-", "_").upper())
        parser.add_argument(*flags, **kw)


def from_args(cls, args: argparse.Namespace, *, only=None, exclude=(), **overrides):
    """An instance of `cls` with the selected fields read from `args` (the rest keep their defaults);
    `overrides` win over both (for values the caller resolved, e.g. out_dir)."""
    kw = {}
    for f in selected_fields(cls, only, exclude):
        if f.name in overrides:
            continue
        if not hasattr(args, f.name):
            raise AttributeError(f"the parsed arguments have no {f.name!r}: add_fields({cls.__name__}, ...) "
                                 "was not called with the same selection")
        value = getattr(args, f.name)
        kw[f.name] = list(value) if isinstance(value, list) else value
    return cls(**kw, **overrides)
