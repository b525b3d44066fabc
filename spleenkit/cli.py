"""The ``spleenkit`` command: parses arguments and calls the package's functions.

Thin on purpose. Only argparse and the standard library are imported at start-up; each
command imports the module it needs inside its handler, so ``spleenkit --help`` stays fast.
A :class:`~spleenkit.errors.SpleenkitError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from spleenkit import __version__
from spleenkit.errors import SpleenkitError

Handler = Callable[[argparse.Namespace], int | None]


def _command(subparsers: argparse._SubParsersAction, name: str, handler: Handler, help_text: str,
             **kwargs: object) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, **kwargs)
    parser.set_defaults(handler=handler)
    return parser


# --------------------------------------------------------------------------- info, presets
def _info(args: argparse.Namespace) -> int:
    import json

    from spleenkit.environment import environment_report

    print(json.dumps(environment_report(), indent=2))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from spleenkit.presets import PRESETS

    for preset in PRESETS.values():
        print(f"{preset.name:14s} {preset.description}")
    return 0


def _add_general_commands(subparsers: argparse._SubParsersAction) -> None:
    _command(subparsers, "info", _info, "Print versions, device, cores, memory and GPUs as JSON.")
    _command(subparsers, "presets", _presets, "List the training recipes.")


# --------------------------------------------------------------------------- command groups
# Each concern adds its commands in a function of its own below; keep the heavy imports
# inside the handlers.

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (cheap: imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        prog="spleenkit",
        description="3D spleen segmentation in CT with MONAI: data, training, evaluation, inference, notebooks.",
    )
    parser.add_argument("--version", action="version", version=f"spleenkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _COMMAND_GROUPS:
        add(subparsers)
    return parser


_COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [_add_general_commands]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m spleenkit``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except SpleenkitError as error:
        print(f"spleenkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spleenkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
