"""Command-line flags built from dataclass fields, and their reference page (``docs/flags.md``).

Every field of the config dataclasses (:mod:`unetlab.config`) and of ``PredictOptions`` carries its help line
in its metadata (``help``); the flags of ``train``, ``augment-preview``, ``predict`` ... are built from it here,
and ``unetlab flags`` writes the same parsers' help as Markdown, so the command line and the docs cannot drift
apart.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from .config import RunConfig, leaf_keys, type_hints

CONFIG_SECTIONS = {"data": "data", "model": "model", "train": "training", "postprocess": "post-processing"}


def _section_class(section: str) -> type:
    obj: Any = RunConfig
    for part in section.split("."):
        obj = type_hints(obj)[part]
    return obj


def _shown(value: Any) -> str:
    """A default as the command line writes it: ``0.9,1.1`` for lists, ``none``, ``true``/``false``."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _metavar(typ: Any) -> str:
    """The flag's value placeholder: ``N`` (integer), ``X`` (number), ``A,B`` (list), ``BOOL`` or ``V``."""
    union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(typ) if a is not type(None)] if union else [typ]
    inner = args[0] if len(args) == 1 else None
    if typing.get_origin(inner) in (list, tuple):
        return "A,B"
    return {int: "N", float: "X", bool: "BOOL"}.get(inner, "V")


def help_text(field_help: str, default: Any) -> str:
    """A flag's help: the field's help line, then its default unless the line already says it (``none: ...``);
    a field without one still gets its flag (tests/test_cli_flags.py then asks for the line)."""
    if not field_help:
        return f"(default {_shown(default)})".replace("%", "%%")
    if "default" in field_help or default is MISSING or (default is None and "none:" in field_help):
        text = field_help
    else:
        text = f"{field_help} (default {_shown(default)})"
    return text.replace("%", "%%")


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = (), only: str | None = None) -> None:
    """One flag per config leaf (``--lr``, ``--patch-size``, ``--aug-elastic`` ...) of section ``only``
    (default: all), except ``skip``; only given flags override (see :func:`config_overrides`)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (section, field_name, typ, default) in leaf_keys().items():
        if name in skip or (only is not None and section != only):
            continue
        g = groups.get(section)
        if g is None:
            title = "augmentation" if section.endswith("augment") else CONFIG_SECTIONS.get(section, section)
            g = groups[section] = p.add_argument_group(f"{title} options (config '{section}')")
        meta = next(f.metadata for f in fields(_section_class(section)) if f.name == field_name)
        kw: dict[str, Any] = {"dest": f"cfg__{name}", "default": argparse.SUPPRESS,
                              "metavar": meta.get("metavar") or _metavar(typ), "help": help_text(meta.get("help", ""), default)}
        if typ is bool:
            kw.update(nargs="?", const="true")
        g.add_argument("--" + name.replace("_", "-"), **kw)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The leaf overrides given on the command line through :func:`add_config_flags` (``{"lr": "1e-3"}``)."""
    return {k[5:]: v for k, v in vars(args).items() if k.startswith("cfg__")}


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls``, with the type, default, choices and help of the field and
    its metadata (``help``, and optionally ``flag`` (None: no flag), ``choices``, ``metavar``, ``cli_type``,
    ``cli_default``); a field whose command-line default is False becomes a switch."""
    hints = type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if flag is None:
            continue
        default = meta.get("cli_default", f.default)
        kw: dict[str, Any] = {"dest": f.name, "default": default}
        if default is False:
            kw.update(action="store_true", help=meta["help"].replace("%", "%%"))
        else:
            typ = meta.get("cli_type") or next(a for a in (*typing.get_args(hints[f.name]), hints[f.name])
                                               if a is not type(None))
            if typ in (int, float):
                kw["type"] = typ
            kw.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
            kw["help"] = help_text(meta["help"], default)
        p.add_argument(flag, **kw)


def dataclass_from_args(args: argparse.Namespace, cls: type) -> Any:
    """An instance of ``cls`` from the flags :func:`add_dataclass_flags` declared, each value passed through
    its field's ``from_cli`` converter when it has one."""
    values = {}
    for f in fields(cls):
        if f.name in vars(args) and f.metadata.get("flag", "") is not None:
            convert = f.metadata.get("from_cli")
            values[f.name] = convert(getattr(args, f.name)) if convert else getattr(args, f.name)
    return cls(**values)


# --- the reference page ----------------------------------------------------------------------------------------


def _invocation(action: argparse.Action) -> str:
    """``--tile N`` / ``--instances`` / ``mask`` as the usage line writes one argument."""
    if not action.option_strings:
        return action.metavar or action.dest
    flag = ", ".join(action.option_strings)
    if action.nargs == 0:
        return flag
    metavar = action.metavar or action.dest.upper()
    if action.choices and not action.metavar:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    return f"{flag} [{metavar}]" if action.nargs == "?" else f"{flag} {metavar}"


def parser_markdown(parser: argparse.ArgumentParser, prog: str = "unetlab") -> str:
    """Every subcommand's flags of ``parser`` with their help lines, as Markdown (``docs/flags.md``)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [f"# `{prog}` command-line flags", "",
             f"Written by `{prog} flags --out docs/flags.md` from the flags' own help (one source for the "
             f"command line and this page); `{prog} COMMAND --help` shows the same.", ""]
    seen: dict[str, tuple[str, set[str]]] = {}  # group title -> the command that listed it first, its flags
    for name, p in [("", parser), *sub.choices.items()]:
        title, about = (f"`{prog} {name}`", p.description) if name else \
            (f"`{prog}` (before any command)", f"e.g. `{prog} -q train ...`")
        lines += [f"## {title}", "", about or "", ""]
        for group in p._action_groups:
            actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS
                       and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
            if not actions:
                continue
            title = group.title if group.title not in ("options", "optional arguments") else "options"
            flags = {a.option_strings[0] for a in actions if a.option_strings}
            first, listed = seen.setdefault(title, (name, flags))
            if "(config '" in title and first != name and flags <= listed:  # the config flags of train, again: named, not repeated
                missing = sorted(listed - flags)
                but = f", except {', '.join(f'`{m}`' for m in missing)}" if missing else ""
                lines += [f"### {title}", "", f"The same flags as `{prog} {first}`{but}.", ""]
                continue
            lines += [f"### {title}", ""]
            lines += [f"- `{_invocation(a)}`: {(a.help or '').replace('%%', '%')}" for a in actions]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


__all__ = ["CONFIG_SECTIONS", "add_config_flags", "add_dataclass_flags", "config_overrides",
           "dataclass_from_args", "help_text", "parser_markdown"]
