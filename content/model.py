"""Plain data types of the content store (no gRPC, no SQL)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestStatus:
    ref: str
    offset: int
    total: int
    started_ns: int
    updated_ns: int
    expected: str = ""


class WriteAction(enum.IntEnum):
    """Numbered as on the wire; STAT is the default (0)."""

    STAT = 0
    WRITE = 1
    COMMIT = 2


@dataclass(frozen=True)
class WriteRequest:
    action: WriteAction = WriteAction.STAT
    ref: str = ""
    total: int = 0
    expected: str = ""
    offset: int = 0
    data: bytes = b""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteResponse:
    action: WriteAction
    offset: int
    total: int = 0
    digest: str = ""
    started_ns: int = 0
    updated_ns: int = 0
