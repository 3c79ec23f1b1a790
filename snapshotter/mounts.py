"""The overlay mount rules: the one place that turns a snapshot into mounts.

What containerd's built-in ``overlayfs`` snapshotter returns, and so what pysnap
returns (one mount, no target, every option its own string, absolute host paths):

==========================  ===========================================================
snapshot                    mount
==========================  ===========================================================
active, no parent           bind of its own ``fs``, ``rw,rbind``
active, >= 1 parent         overlay: ``workdir``, ``upperdir``, ``lowerdir`` + options
view, no parent             bind of its own (empty) ``fs``, ``ro,rbind``
view, exactly 1 parent      bind of the *parent's* ``fs``, ``ro,rbind``
view, >= 2 parents          overlay with only ``lowerdir`` (read-only) + options
committed                   not mountable
==========================  ===========================================================

``lowerdir`` lists the parents nearest first (overlayfs' order: leftmost is on
top).  Configured overlay options (``index=off``, ``userxattr``, operator
``mount_options``) follow the layer options, as in containerd 2.x, and never apply
to bind mounts.  pysnap does not advertise containerd's ``remap-ids``
capability, so it emits no ``uidmap``/``gidmap`` options: containerd's client
remaps user-namespaced snapshots itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pysnap.errors import FailedPrecondition

from .model import Kind

UID_MAPPING_LABEL = "containerd.io/snapshot/uidmapping"
GID_MAPPING_LABEL = "containerd.io/snapshot/gidmapping"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]
    target: str = ""


def snapshot_mounts(
    name: str,
    kind: Kind,
    upper: Path,
    work: Path,
    lowers: Sequence[Path],
    overlay_options: Sequence[str] = (),
) -> list[Mount]:
    """Mounts for a snapshot whose own dirs are ``upper``/``work`` and whose
    parents' ``fs`` dirs are ``lowers`` (nearest first)."""
    if kind is Kind.ACTIVE:
        if not lowers:
            return [Mount("bind", str(upper), ("rw", "rbind"))]
        layers = (f"workdir={work}", f"upperdir={upper}", lowerdir_option(lowers))
        return [Mount("overlay", "overlay", layers + tuple(overlay_options))]
    if kind is Kind.VIEW:
        if not lowers:
            return [Mount("bind", str(upper), ("ro", "rbind"))]
        if len(lowers) == 1:
            return [Mount("bind", str(lowers[0]), ("ro", "rbind"))]
        return [Mount("overlay", "overlay", (lowerdir_option(lowers),) + tuple(overlay_options))]
    raise FailedPrecondition(f"requested snapshot {name} not active or view")


def lowerdir_option(lowers: Sequence[Path]) -> str:
    return "lowerdir=" + ":".join(str(p) for p in lowers)
