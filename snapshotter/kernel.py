"""What the running kernel's overlayfs needs, decided once at start-up.

Mirrors containerd's rules for the options it adds to every overlay mount:
``index=off`` whenever the overlay module exposes an ``index`` parameter (unless
the operator configured the bare option ``index``; as in containerd, ``index=on``
does not count), and ``userxattr`` only inside a
user namespace (on the host it is never needed) when the kernel supports it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

OVERLAY_PARAMETERS = Path("/sys/module/overlay/parameters")


@dataclass(frozen=True)
class OverlayFeatures:
    has_index_parameter: bool
    in_user_namespace: bool
    kernel: tuple[int, int]

    @classmethod
    def probe(cls) -> "OverlayFeatures":
        return cls(
            has_index_parameter=(OVERLAY_PARAMETERS / "index").exists(),
            in_user_namespace=_in_user_namespace(),
            kernel=_kernel_version(),
        )

    def overlay_options(self, configured: list[str], root_on_tmpfs: bool) -> list[str]:
        options = list(configured)
        if self.in_user_namespace and not root_on_tmpfs and self.kernel >= (5, 11) and "userxattr" not in options:
            options.append("userxattr")
        # containerd's hasOption(options, "index", false) matches only the bare word "index":
        # a configured "index=on" does not suppress "index=off".
        if self.has_index_parameter and "index" not in options:
            options.append("index=off")
        return options


def _in_user_namespace() -> bool:
    try:
        fields = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return fields[:3] != ["0", "0", "4294967295"]


def _kernel_version() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def mount_table() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount this process sees."""
    table = []
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                table.append((_unescape(fields[4]), fstype))
    except OSError:
        pass
    return table


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_tmpfs(path: Path) -> bool:
    """True when ``path`` lives on tmpfs (overlay upper dirs there need no userxattr)."""
    best = ("", "")
    for target, fstype in mount_table():
        if (str(path) + "/").startswith(target.rstrip("/") + "/") and len(target) >= len(best[0]):
            best = (target, fstype)
    return best[1] == "tmpfs"
