"""`fpdm`: the command line. Subcommands are plugins (`register_commands`), built-ins included."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from fpdm import __version__
from fpdm.errors import FpdmError
from fpdm.registry import default_registry


class _Parser(argparse.ArgumentParser):
    """argparse that answers a usage mistake with one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fpdm", description="Fixed Point Diffusion Models: train, sample, study, deploy.")
    parser.add_argument("--version", action="version", version=f"fpdm {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    registry = default_registry()
    for name in registry.names("command"):
        entry = registry.entry("command", name)
        command = sub.add_parser(name, help=entry.description, description=entry.description, parents=[debug])
        try:
            command.set_defaults(_run=entry.factory(command))
        except Exception as exc:  # a broken command plugin must not take the other commands down
            sys.stderr.write(f"fpdm: warning: command {name!r} from plugin {entry.plugin!r} is unusable: {exc}\n")
            sub._name_parser_map.pop(name, None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
    except Exception as exc:
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        owner = default_registry().blame(exc)  # a third-party plugin's code raised: name it, it is not fpdm's bug
        where = f" in plugin {owner}" if owner else ""
        sys.stderr.write(f"fpdm {args.command}: internal error{where}: {type(exc).__name__}: {first} "
                         "(rerun with --debug)\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
