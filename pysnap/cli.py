"""The ``pysnap`` command: argument parsing and logging set-up; the commands live
in ``pysnap/commands/``."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .commands import COMMANDS
from .config import DEFAULT_CONFIG_PATH, ConfigError
from .logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pysnap", description="containerd proxy plugins in Python")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pysnap.commands.{name}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"pysnap: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pysnap status | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
