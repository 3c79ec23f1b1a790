"""Performing snapshot mounts on the host, and undoing them.

Mount lists come from the snapshotter (``snapshotter/mounts.py`` builds them);
this module only executes them.  mount(2) is called directly; an overlay whose
option string would not fit in one page (e.g. 128 layers) is mounted by
``mount(8)`` run from the layers' common parent directory with relative
``lowerdir`` paths, as containerd's own mounter does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
from pathlib import Path

from snapshotter.kernel import mount_table
from snapshotter.mounts import Mount

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2
PAGE_LIMIT = 4095

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(OSError):
    pass


def _mount(source: str, target: Path, fstype: str, flags: int, data: str = "") -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode() or None) != 0:
        errno = ctypes.get_errno()
        raise MountError(errno, f"mount {fstype} {source} on {target}: {os.strerror(errno)}")


def mount_snapshot(mounts: list[Mount], target: Path) -> None:
    """Mount a snapshot's single mount at ``target`` (created if missing)."""
    if len(mounts) != 1:
        raise MountError(0, f"expected one mount for a snapshot, got {len(mounts)}")
    mount = mounts[0]
    target.mkdir(parents=True, exist_ok=True)
    if mount.type == "bind":
        flags = MS_BIND | (MS_REC if "rbind" in mount.options else 0)
        _mount(mount.source, target, "", flags)
        if "ro" in mount.options:
            _mount("", target, "", MS_REMOUNT | MS_BIND | MS_RDONLY)
        return
    if mount.type != "overlay":
        raise MountError(0, f"unsupported mount type {mount.type!r}")
    data = ",".join(mount.options)
    if len(data) <= PAGE_LIMIT:
        _mount(mount.source, target, "overlay", 0, data)
    else:
        _mount_compacted_overlay(mount, target)


def _mount_compacted_overlay(mount: Mount, target: Path) -> None:
    lowers = next(o for o in mount.options if o.startswith("lowerdir=")).split("=", 1)[1].split(":")
    base = os.path.commonpath(lowers)
    options = []
    for option in mount.options:
        if option.startswith("lowerdir="):
            option = "lowerdir=" + ":".join(os.path.relpath(p, base) for p in lowers)
        options.append(option)
    result = subprocess.run(["mount", "-t", "overlay", mount.source, "-o", ",".join(options), str(target)],
                            cwd=base, capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(0, f"mount overlay on {target}: {result.stderr.strip()}")


def unmount_tree(root: Path) -> None:
    """Unmount everything at or below ``root`` (deepest first), then remove the
    directories pysnap made there.  Busy mounts are detached lazily."""
    prefix = str(root).rstrip("/") + "/"
    targets = sorted({t for t, _ in mount_table() if t == str(root) or t.startswith(prefix)},
                     key=len, reverse=True)
    for target in targets:
        if _libc.umount2(target.encode(), 0) != 0:
            _libc.umount2(target.encode(), MNT_DETACH)
    if root.exists():
        for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(str(p)), reverse=True):
            _rmdir_quietly(directory)
        _rmdir_quietly(root)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def is_mounted(path: Path) -> bool:
    return any(t == str(path) for t, _ in mount_table())
