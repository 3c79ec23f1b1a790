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
    return [(entry.target, entry.fstype) for entry in mount_entries()]


@dataclass(frozen=True)
class MountEntry:
    target: str
    fstype: str
    source: str
    options: str  # the superblock options, e.g. an overlay's lowerdir=…,upperdir=…,workdir=…


def mount_entries(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[MountEntry]:
    """Every mount this process sees, from ``/proc/self/mountinfo``."""
    table = []
    try:
        with open(mountinfo) as lines:
            for line in lines:
                fields = line.split()
                dash = fields.index("-")
                rest = fields[dash + 1:] + ["", "", ""]
                table.append(MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1]), _unescape(rest[2])))
    except (OSError, ValueError):
        pass
    return table


def filesystem_type(path: Path) -> str:
    """Type of the filesystem ``path`` lives on ("" if unknown)."""
    best = ("", "")
    for target, fstype in mount_table():
        if (str(path) + "/").startswith(target.rstrip("/") + "/") and len(target) >= len(best[0]):
            best = (target, fstype)
    return best[1]


def in_use_by_mounts(path: Path, entries: list[MountEntry]) -> str:
    """Why ``path`` is in use by a mount ("" if it is not): something is mounted at or
    below it, or an overlay uses a directory below it as a layer (upperdir, lowerdir,
    workdir appear in the overlay's superblock options, not as mount points)."""
    top = str(path)
    below = top + "/"
    layer = re.compile(r"(?:^|[=:,])" + re.escape(top) + r"(?:/|[:,]|$)")
    for entry in entries:
        if entry.target == top or entry.target.startswith(below):
            return f"{entry.target} is mounted below it"
        if entry.fstype == "overlay" and layer.search(entry.options):
            return f"the overlay mounted at {entry.target} uses it as a layer"
    return ""


def overlay_parameters(directory: Path = OVERLAY_PARAMETERS) -> dict[str, str]:
    """The overlay module's parameters (``index`` → ``Y``…); empty when it exposes none."""
    values = {}
    try:
        for entry in sorted(directory.iterdir()):
            try:
                values[entry.name] = entry.read_text().strip()
            except OSError:
                continue
    except OSError:
        pass
    return values


def supports_d_type(directory: Path) -> bool | None:
    """Whether the filesystem of ``directory`` fills in ``d_type`` in readdir (overlayfs
    needs it: xfs formatted with ftype=0 does not).  Looks at the existing entries of
    ``directory`` without writing anything; None when it has none to look at."""
    import ctypes

    class Dirent64(ctypes.Structure):
        _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                    ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]

    libc = ctypes.CDLL(None, use_errno=True)
    readdir = getattr(libc, "readdir64", None) or libc.readdir
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    readdir.restype = ctypes.POINTER(Dirent64)
    readdir.argtypes = [ctypes.c_void_p]
    handle = libc.opendir(os.fsencode(directory))
    if not handle:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), str(directory))
    try:
        while True:
            entry = readdir(handle)
            if not entry:
                return None
            if entry.contents.d_name in (b".", b".."):
                continue
            return entry.contents.d_type != 0  # DT_UNKNOWN
    finally:
        libc.closedir(handle)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_tmpfs(path: Path) -> bool:
    """True when ``path`` lives on tmpfs (overlay upper dirs there need no userxattr)."""
    return filesystem_type(path) == "tmpfs"
