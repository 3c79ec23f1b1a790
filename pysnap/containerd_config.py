"""The containerd config.toml snippet that wires pysnap in, per containerd version."""
from __future__ import annotations

import platform
from pathlib import Path

from .config import Config

SNAPSHOTTER_PLUGIN = "pysnap"
CONTENT_PLUGIN = "pysnap-content"  # never a built-in's name: containerd panics on duplicates
BUILTIN_CONTENT = "io.containerd.content.v1.content"
PARTS = ("snapshotter", "content")
VERSIONS = ("1.7", "2")


def host_platform() -> str:
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
    return f"linux/{arch.get(machine, machine)}"


def containerd_snippet(version: str, config: Config, parts: tuple[str, ...] = PARTS) -> str:
    """config.toml lines for containerd ``version`` (``1.7`` or ``2``) wiring in ``parts``."""
    if version not in VERSIONS:
        raise ValueError(f"unsupported containerd version {version!r}; choose one of {', '.join(VERSIONS)}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    config_version = 2 if version == "1.7" else 3
    lines = [f"# pysnap for containerd {version}.x (config.toml version = {config_version})"]
    if "content" in parts:
        # pysnap must be the only content store: with the built-in still enabled 1.7 picks
        # one of the two at random per start and 2.x fails its metadata plugin.
        lines += [
            "# Top-level key: merge it into an existing disabled_plugins list instead of repeating it.",
            f'disabled_plugins = ["{BUILTIN_CONTENT}"]',
            "",
        ]
    if "snapshotter" in parts:
        snap = config.snapshotter
        lines += [
            f"[proxy_plugins.{SNAPSHOTTER_PLUGIN}]",
            '  type = "snapshot"',
            f"  address = {_quote(snap.address)}",
            f"  [proxy_plugins.{SNAPSHOTTER_PLUGIN}.exports]",
            f"    root = {_quote(snap.root)}",
            "",
        ]
    if "content" in parts:
        lines += [
            f'[proxy_plugins."{CONTENT_PLUGIN}"]',
            '  type = "content"',
            f"  address = {_quote(config.content.address)}",
            "",
        ]
    if version == "2" and "snapshotter" in parts:
        # containerd 2.x's transfer service (plain `ctr images pull`) unpacks only into
        # snapshotters listed here; the list replaces the built-in default, so keep overlayfs too.
        for snapshotter in ("overlayfs", SNAPSHOTTER_PLUGIN):
            lines += [
                '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
                f'  platform = "{host_platform()}"',
                f'  snapshotter = "{snapshotter}"',
                '  differ = "walking"',
                "",
            ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _quote(path: Path | str) -> str:
    text = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
