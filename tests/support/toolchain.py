"""Toolchain lookup for tests (docs/DEVLAYOUT.md): a missing tool is an error, never a skip.

Values come from the environment (scripts/test.sh sources toolchain.env) or, when unset,
from ``$PYSNAP_CACHE/toolchain.env`` written by ``scripts/provision.sh``.
"""

from __future__ import annotations

import os
import shlex
from functools import cache
from pathlib import Path

DEFAULT_CACHE = "/var/cache/pysnap-dev"
NAMES = (
    "PYSNAP_CONTAINERD_17",
    "PYSNAP_CONTAINERD_21",
    "PYSNAP_RUNC",
    "PYSNAP_REGISTRY",
    "PYSNAP_BUSYBOX",
    "PYSNAP_GOROOT",
    "PYSNAP_GOPATH",
    "PYSNAP_CRI_PROTO",
)


class ToolchainMissing(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("PYSNAP_CACHE") or DEFAULT_CACHE)


@cache
def _env_file() -> dict[str, str]:
    """``export K=V`` lines of toolchain.env ({} when the file does not exist)."""
    path = cache_dir() / "toolchain.env"
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            values[key] = value
    return values


def require(name: str) -> str:
    """Absolute path named by toolchain variable ``name`` (e.g. "PYSNAP_GOROOT"); raises if unusable."""
    value = os.environ.get(name) or _env_file().get(name)
    hint = "run scripts/provision.sh (or scripts/test.sh), which writes $PYSNAP_CACHE/toolchain.env"
    if not value:
        raise ToolchainMissing(f"{name} is not set and not in {cache_dir() / 'toolchain.env'}: {hint}")
    if not os.path.exists(value):
        raise ToolchainMissing(f"{name}={value} does not exist: {hint}")
    return value
