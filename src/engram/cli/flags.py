"""Flags generated from the config dataclasses, the flags many commands share, and the parser.

``add_config_flags(parser, Config)`` adds one flag per field of a config dataclass: ``--field-name``
unless the field's metadata names another ``flag`` (and ``aliases``, old spellings that still work); type, default, help, choices and metavar come
from the field (``engram.config.setting``). ``config_from_args(args, Config)`` builds the config
back from the parsed flags, so a new field is a new flag with nothing else to write. ``add_common``
declares ``--json --quiet --data --ckpt --out`` once. ``ArgumentParser`` prints argparse's own
errors (unknown flag, bad choice, ``--steps abc``) as one line ``engram: error: ...``, exit 2.

Why not jsonargparse or tyro: each would own the parser instead of feeding ours. jsonargparse's
``add_class_arguments`` nests a config's flags under a prefix (``--storage.path``) and brings its
own parser, error output and PyYAML; tyro builds the whole command tree from types and spells every
flag from field names, printing multi-line rich-formatted errors (rich, typeguard and
docstring_parser on the ``--help`` import path). Renaming a field's flag (``path`` -> ``--table``),
``--fetch-process / --no-fetch-process``, subcommands registered by several modules and the
one-line error would all fight either library; ~100 lines over argparse keep them.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, NoReturn, Optional, Union

from engram.config import field_types
from engram.errors import EngramError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors as the one line every engram error is (exit status 2).

    Subparsers inherit the class (``add_subparsers`` uses the parent's type)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"engram: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------- config flags
def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    return flag_name(f)[2:].replace("-", "_")  # what argparse names the attribute


def _unwrap(hint: Any) -> Any:
    """Optional[X] -> X; Union[str, TableLocation] -> str (the spelling on the command line)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_flags(parser: Any, cls: type, *, only: Optional[tuple[str, ...]] = None,
                     defaults: Optional[dict[str, Any]] = None) -> None:
    """One flag per field of ``cls`` (or of the fields in ``only``), in field order; ``defaults``
    replaces a field's default on this command only (e.g. None: "not given", the handler decides)."""
    defaults = defaults or {}
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        meta, typ = f.metadata, _unwrap(hints[f.name])
        kw: dict[str, Any] = {k: meta[k] for k in ("metavar", "choices", "action") if k in meta}
        kw["help"] = meta.get("help") or None
        if "action" in meta:  # append / store_true: argparse's own default (None / False)
            if f.name in defaults:
                kw["default"] = defaults[f.name]
        else:
            kw["default"] = defaults.get(f.name, f.default)
            if typ is bool:  # off by default: a switch; else --x / --no-x
                kw["action"] = "store_true" if kw["default"] is False else argparse.BooleanOptionalAction
            elif typing.get_origin(typ) is tuple:
                item = typing.get_args(typ)[0]
                kw.update(nargs="+", type=_number_list(item) if item in (int, float) else item)
            elif typ in (int, float):
                kw["type"] = typ
        if kw.get("type") is str:
            del kw["type"]
        parser.add_argument(flag_name(f), *meta.get("aliases", ()), **kw)  # aliases: old spellings


def config_from_args(args: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    """``cls`` from the flags ``add_config_flags`` added (a flag left at None takes the field's
    default unless the field is Optional); ``overrides`` win (values the handler resolved)."""
    hints = field_types(cls)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides or not hasattr(args, _dest(f)):
            continue
        value = getattr(args, _dest(f))
        if value is None and type(None) not in typing.get_args(hints[f.name]):
            continue
        if isinstance(value, list):  # nargs="+"; numbers may also come comma-separated, "1,15"
            value = tuple(v for x in value for v in (x if isinstance(x, list) else [x]))
        kw[f.name] = value
    return cls(**kw, **overrides)


def _number_list(item: type) -> Any:
    """argparse ``type`` of a numeric tuple field: ``"1,15"`` -> [1, 15] (``config_from_args`` flattens)."""
    def parse(text: str) -> list[Any]:
        try:
            return [item(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {_NUMBERS[item]} separated by commas or "
                                             f"spaces, e.g. 1,2,3") from None
    return parse


_NUMBERS = {int: "integers", float: "numbers"}


# ----------------------------------------------------------------------------- shared flags
_COMMON: dict[str, dict[str, Any]] = {
    "--json": dict(action="store_true", help="print the result as JSON"),
    "--quiet": dict(action="store_true", help="no progress output"),
    "--data": dict(help="dataset directory from `engram data prepare`"),
    "--ckpt": dict(help="a run directory (engram train) or a retrofit adapter (engram retrofit train)"),
    "--out": dict(help="where the result goes"),
}


def add_common(parser: Any, flag: str, **overrides: Any) -> None:
    """Add one of the shared flags; ``overrides`` (``required``, ``help``, ``nargs``, ...) adapt it."""
    parser.add_argument(flag, **{**_COMMON[flag], **overrides})


def add_json_file(parser: Any, help: str = "also write the result as JSON to this file") -> None:
    """``--json PATH`` of the commands that print tables and write their JSON to a file."""
    add_common(parser, "--json", action="store", help=help)


def add_page_flags(parser: Any, page_help: str, machine: str) -> None:
    """``--page FILE`` and what the page shows beside the numbers: the commands and the machine
    (``machine`` is the default of ``--page-machine``)."""
    parser.add_argument("--page", help=page_help)
    parser.add_argument("--page-command", help="the commands that made the runs, shown on the page")
    parser.add_argument("--page-machine", default=machine, help="the machine, shown on the page")


def add_device_args(parser: Any, dtype: bool = True) -> None:
    """``--device cpu|cuda|cuda:N`` (and ``--dtype fp32|bf16``): where and in what precision a
    command runs its model (``engram.model.accel``)."""
    g = parser.add_argument_group("device (docs/gpu.md)")
    g.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda or cuda:N")
    if dtype:
        g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                       help="precision of the forward passes: fp32 (default) or bf16 autocast")


def add_prompt_args(parser: Any) -> None:
    """``--prompt TEXT`` (repeatable) and ``--prompts-file FILE`` of the generate commands."""
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="text to continue; repeat it for several prompts, generated as one batch")
    parser.add_argument("--prompts-file", metavar="FILE",
                        help="one prompt per line (blank lines skipped), after any --prompt")


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    """The prompts of ``--prompt`` and ``--prompts-file``, in that order; none is an error."""
    texts = list(args.prompt or [])
    if getattr(args, "prompts_file", None):
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                texts += [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise EngramError(f"--prompts-file {args.prompts_file}: cannot read it ({e}); give a UTF-8 "
                              f"text file with one prompt per line") from None
    if not texts:
        raise EngramError("no prompt given; give --prompt TEXT (repeatable) or --prompts-file FILE")
    return texts


def encode_prompts(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt (a ``tokenizers.Tokenizer``); a prompt of no tokens is an error."""
    out = []
    for text in texts:
        ids = tok.encode(text).ids
        if not ids:
            raise EngramError(f"prompt {text!r} encodes to no tokens; give some text")
        out.append(ids)
    return out


def print_generations(texts: list[str]) -> None:
    """One generated text as it is; several each under a ``--- i/N`` line."""
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- {i + 1}/{len(texts)}")
        print(text)


def int_list(text: str, flag: str) -> list[int]:
    """``"1,2,3"`` (or spaces) -> [1, 2, 3] for list-valued flags, refused in one line otherwise."""
    try:
        return [int(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise EngramError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
