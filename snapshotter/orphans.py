"""Removing snapshot directories no snapshot owns — the one procedure shared by the
daemon's background reaper and ``pysnap gc``.

1. Under the metadata write lock (so no Prepare is half-way), each orphan is
   renamed to ``reaping-<random>``, a name no snapshot ID can take: a Prepare that
   later reuses the orphan's ID can never lose its new directory to the deletion.
   An orphan still used by a mount (something mounted below it, or an overlay using
   a directory below it as a layer) is left alone.
2. After the lock is released, the set-aside directories are deleted.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .kernel import MountEntry, in_use_by_mounts

REAPING_PREFIX = "reaping-"  # never a snapshot ID


class DirectoryInUse(Exception):
    """The directory is used by a mount; the message says which."""


def set_aside(snapshots_dir: Path, name: str, mounts: list[MountEntry]) -> Path:
    """Rename orphan ``name`` out of the way (call with the metadata write lock held).

    Raises DirectoryInUse, FileNotFoundError (it vanished meanwhile) or OSError."""
    path = snapshots_dir / name
    busy = in_use_by_mounts(path, mounts)
    if busy:
        raise DirectoryInUse(busy)
    if name.startswith(REAPING_PREFIX):
        return path
    target = snapshots_dir / f"{REAPING_PREFIX}{uuid.uuid4().hex}"
    os.rename(path, target)
    return target


def delete(path: Path) -> None:
    """Delete a set-aside file or tree; a part already gone (another remover got there first) is fine."""
    def tolerate_vanished(function, target, exc_info) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=tolerate_vanished)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
