"""Plain data types of the snapshotter domain (no gRPC, no SQL)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as containerd numbers them on the wire."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        """The word containerd's filters use (``kind==active``)."""
        return self.name.lower()


@dataclass(frozen=True)
class Info:
    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Record:
    """A snapshot row as the metadata store holds it."""

    id: int
    name: str
    kind: Kind
    parent: str
    created_ns: int
    updated_ns: int
    labels: dict[str, str]
    usage: Usage

    def info(self) -> Info:
        return Info(self.name, self.parent, self.kind, self.created_ns, self.updated_ns, dict(self.labels))
