"""The containerd config.toml snippet that wires pysnap in, per containerd version."""
from __future__ import annotations

import platform
from pathlib import Path

from .config import Config

SNAPSHOTTER_PLUGIN = "pysnap"
VERSIONS = ("1.7", "2")


def host_platform() -> str:
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
    return f"linux/{arch.get(machine, machine)}"


def containerd_snippet(version: str, config: Config) -> str:
    """config.toml lines for containerd ``version`` (``1.7`` or ``2``)."""
    if version not in VERSIONS:
        raise ValueError(f"unsupported containerd version {version!r}; choose one of {', '.join(VERSIONS)}")
    snap = config.snapshotter
    config_version = 2 if version == "1.7" else 3
    lines = [
        f"# pysnap for containerd {version}.x (config.toml version = {config_version})",
        f"[proxy_plugins.{SNAPSHOTTER_PLUGIN}]",
        '  type = "snapshot"',
        f"  address = {_quote(snap.address)}",
        f"  [proxy_plugins.{SNAPSHOTTER_PLUGIN}.exports]",
        f"    root = {_quote(snap.root)}",
    ]
    if version == "2":
        # containerd 2.x's transfer service (plain `ctr images pull`) unpacks only into
        # snapshotters listed here; the list replaces the built-in default, so keep overlayfs too.
        for snapshotter in ("overlayfs", SNAPSHOTTER_PLUGIN):
            lines += [
                "",
                '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
                f'  platform = "{host_platform()}"',
                f'  snapshotter = "{snapshotter}"',
                '  differ = "walking"',
            ]
    return "\n".join(lines) + "\n"


def _quote(path: Path | str) -> str:
    text = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
