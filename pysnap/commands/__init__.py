"""Subcommands of ``pysnap``: each module has ``register(subparsers)``."""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from ..config import DEFAULT_CONFIG_PATH, Config

COMMANDS = ("serve", "config", "doctor", "status", "fsck", "gc", "install")  # each names a module here with register(subparsers)


def with_overrides(config: Config, section: str, **values: object) -> Config:
    """``config`` with the non-empty ``values`` replacing keys of ``section``."""
    values = {k: v for k, v in values.items() if v}
    if not values:
        return config
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})


def accept_config_option(parser: argparse.ArgumentParser) -> None:
    """Let ``--config`` also follow the command (``pysnap gc --config FILE``)."""
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``24h``, ``2d`` or ``1h30m`` (an argparse type)."""
    parts = re.fullmatch(r"((?:\d+(?:\.\d+)?[smhd]?)+)", text.strip())
    pieces = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip()) if parts else []
    if not pieces or (len(pieces) > 1 and any(unit == "" for _, unit in pieces)):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 3600, 30m, 24h or 2d")
    return sum(float(number) * _UNITS[unit] for number, unit in pieces)
