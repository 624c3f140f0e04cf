"""`fpdm`: the command line. Subcommands are plugins (`register_commands`), built-ins included.

The start path is argparse-level only (STYLE.md rule 14): `fpdm --help` lists the registered commands
from their names and descriptions without building any of them, and a command's own parser is filled in
(its factory called) only when that command is parsed or asked for `--help`. Factories therefore run one
at a time, and only a command's `run` imports torch.

The helpers below keep one spelling per concept across every command (`--batch-size`, `--json [PATH]`,
`--weights ema|raw`, ...): command modules import them from here, and they stay torch-free.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fpdm.errors import FpdmError, UnknownNameError
from fpdm.registry import default_registry
from fpdm.version import __version__

Handler = Callable[[argparse.Namespace], int]
_NO_CONST = object()


# ---------------------------------------------------------------------------------------------- flag helpers
class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling: stores into the new option's dest and says, in one stderr line, what to use."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, append: bool = False, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new = new
        self.append = append

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        sys.stderr.write(f"fpdm: {option_string} is deprecated; use {self.new}\n")
        value = self.const if self.nargs == 0 else values
        if self.append:  # the alias of a repeatable option adds to the same list
            value = [*(getattr(namespace, self.dest, None) or []), value]
        setattr(namespace, self.dest, value)


def deprecated_alias(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    old: str,
    *,
    dest: str,
    new: str,
    type: Callable[[str], Any] | None = None,
    const: Any = _NO_CONST,
    choices: Sequence[Any] | None = None,
    append: bool = False,
) -> argparse.Action:
    """Add `old` as a hidden alias of the option that stores into `dest` (add that option first or after; its
    default stays in charge because the alias has none). Using it prints exactly one line to stderr,
    `fpdm: OLD is deprecated; use NEW`, and stores the value the new option would store.

    A flag alias takes `const` (the value it stands for): `deprecated_alias(p, "--no-ema", dest="weights",
    new="--weights raw", const="raw")`. Otherwise it takes one value converted by `type`:
    `deprecated_alias(p, "--batch", dest="batch_size", new="--batch-size", type=int)`. `append=True` for the
    alias of an `action="append"` option. The new option must not be `required=True` (argparse would not
    count the alias as having supplied it)."""
    if const is _NO_CONST:
        return parser.add_argument(
            old, action=_DeprecatedAlias, dest=dest, new=new, type=type or str, choices=choices, append=append
        )
    return parser.add_argument(old, action=_DeprecatedAlias, dest=dest, new=new, nargs=0, const=const, append=append)


def add_json_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    help: str = "write the JSON report to PATH; '-' or a bare --json: stdout",
) -> argparse.Action:
    """`--json [PATH]` into `args.json` (None when absent, "-" for stdout). A bare `--json` is the old flag form
    and keeps meaning stdout. Mind nargs="?": a positional right after a bare --json would be taken as PATH,
    so a command with positionals should document `--json -`."""
    return parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH", help=help)


def write_json(payload: Any, target: str) -> None:
    """The JSON report to stdout (`target` "-") or to the file `target` (parent folders created)."""
    import json  # here, not on the start path

    text = json.dumps(payload, indent=2)
    if target == "-":
        print(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def add_model_argument(
    parser: argparse.ArgumentParser,
    *,
    help: str = "a run, checkpoint or packed model folder (default: the run `fpdm train` writes)",
) -> argparse.Action:
    """The optional MODEL positional into `args.model` (None: the run `fpdm train` writes)."""
    return parser.add_argument("model", nargs="?", metavar="MODEL", help=help)


def add_weights_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    help: str = "which weights to use: the EMA or the raw (trained) ones",
) -> argparse.Action:
    """`--weights ema|raw` (default ema) into `args.weights`; the old `--ema` / `--no-ema` stay as hidden aliases."""
    action = parser.add_argument("--weights", choices=("ema", "raw"), default="ema", help=help)
    deprecated_alias(parser, "--ema", dest="weights", new="--weights ema", const="ema")
    deprecated_alias(parser, "--no-ema", dest="weights", new="--weights raw", const="raw")
    return action


def add_device_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, help: str = "auto, cpu, cuda or cuda:N"
) -> argparse.Action:
    """`--device` (default auto) into `args.device`."""
    return parser.add_argument("--device", default="auto", metavar="DEVICE", help=help)


# ---------------------------------------------------------------------------------------------- help text
class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, and with its choices where a metavar hides them.

    Left out as noise: None / SUPPRESS / empty-list defaults, on/off flags (their default is "off"; a
    store_true flag that is on by default, one of a pair, says "(default)"), and help that already states a
    default. An option written without help still shows its default."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 32, width: int | None = None
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.choices is not None and action.metavar is not None and action.option_strings:
            text += f" (choices: {', '.join(str(c) for c in action.choices)})"
        if _shows_default(action) and "default" not in text.lower():
            text += " (default: %(default)s)"
        elif action.nargs == 0 and action.option_strings and action.const is action.default is True:
            text += " (default)"  # one of a flag pair (--sample / --mean): this one is what happens unasked
        return text.strip()


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    if default is None or default is argparse.SUPPRESS or action.help is argparse.SUPPRESS:
        return False
    if isinstance(default, (list, tuple)) and not default:
        return False
    if action.nargs == 0 and isinstance(default, bool):  # store_true / store_false: off is the default
        return False
    return bool(action.option_strings) or action.nargs in ("?", "*")


# ---------------------------------------------------------------------------------------------- parsers
class _Parser(argparse.ArgumentParser):
    """argparse that answers a usage mistake with one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


class _CommandParser(_Parser):
    """A subcommand's parser, filled in by its factory the first time it is parsed or printed."""

    def __init__(
        self, *args: Any, fill: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._fill = fill

    def _ensure_filled(self) -> None:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._ensure_filled()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._ensure_filled()
        return super().format_help()

    def format_usage(self) -> str:
        self._ensure_filled()
        return super().format_usage()


def _filler(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def fill(parser: argparse.ArgumentParser) -> None:
        entry = default_registry().entry("command", name)
        try:
            run = entry.factory(parser)
        except Exception as exc:  # a broken command plugin is one line, not a traceback; the others still work
            sys.stderr.write(
                f"fpdm: error: command {name!r} from plugin {entry.plugin!r} is unusable: {type(exc).__name__}: {exc}\n"
            )
            raise SystemExit(1) from exc
        parser.set_defaults(_run=run)

    return fill


def build_parser(*, fill_all: bool = False) -> argparse.ArgumentParser:
    """The `fpdm` parser; commands are filled in lazily (all at once with `fill_all`, for tests and docs)."""
    parser = _Parser(
        prog="fpdm",
        description="Fixed Point Diffusion Models: train, sample, study, deploy.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fpdm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    debug = _CommandParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)
    registry = default_registry()
    for name in registry.names("command"):
        entry = registry.entry("command", name)
        command = sub.add_parser(
            name,
            help=entry.description,
            description=entry.description,
            parents=[debug],
            formatter_class=HelpFormatter,
            fill=_filler(name),
        )
        if fill_all:
            command._ensure_filled()
    return parser


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of a `build_parser()` result, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _find_command(argv: Sequence[str]) -> None:
    """Make a command registered by a plugin outside the `fpdm.cli` group known before parsing (a registry miss
    loads the other plugins, see fpdm.registry), so `fpdm THEIRCMD` works for plugins written before it."""
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is not None:
        with contextlib.suppress(UnknownNameError):  # argparse then says "invalid choice" and lists the known ones
            default_registry().entry("command", word)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _find_command(argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except FpdmError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"fpdm {args.command}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("fpdm: interrupted\n")
        return 130
    except BrokenPipeError:  # `fpdm ... | head`: the reader left; say nothing, and keep Python quiet at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        owner = default_registry().blame(exc)  # a third-party plugin's code raised: name it, it is not fpdm's bug
        where = f" in plugin {owner}" if owner else ""
        sys.stderr.write(
            f"fpdm {args.command}: internal error{where}: {type(exc).__name__}: {first} (rerun with --debug)\n"
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
