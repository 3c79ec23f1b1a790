"""Disk usage of a snapshot directory, counted as containerd counts it.

Walks the tree without following symlinks, the top directory included; every
distinct inode (st_dev, st_ino) counts once, so hardlinks are not double counted;
``size`` is allocated bytes (st_blocks * 512), directories included.
"""
from __future__ import annotations

import os
from pathlib import Path

from .model import Usage


def disk_usage(top: Path) -> Usage:
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [str(top)]
    st = os.lstat(top)
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    size += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))
