"""Subcommands of ``pysnap``: each module has ``register(subparsers)``."""
from __future__ import annotations

import dataclasses

from ..config import Config

COMMANDS = ("serve", "config")  # each names a module here with register(subparsers)


def with_overrides(config: Config, section: str, **values: object) -> Config:
    """``config`` with the non-empty ``values`` replacing keys of ``section``."""
    values = {k: v for k, v in values.items() if v}
    if not values:
        return config
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
