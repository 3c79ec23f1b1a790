"""The one error hierarchy of pysnap.

Domain code raises these; the gRPC layer (``pysnap.server``) maps them to status
codes in one place.  Messages follow containerd's ``"<context>: <class>"`` form
(e.g. ``snapshot foo: not found``) because containerd's client strips and
re-wraps the trailing class text.
"""
from __future__ import annotations


class PysnapError(Exception):
    """Base class. ``kind`` is the class text containerd appends to messages."""

    kind = "unknown"

    def __init__(self, context: str = "") -> None:
        super().__init__(context)
        self.context = context

    def __str__(self) -> str:
        return f"{self.context}: {self.kind}" if self.context else self.kind


class InvalidArgument(PysnapError):
    kind = "invalid argument"


class NotFound(PysnapError):
    kind = "not found"


class AlreadyExists(PysnapError):
    kind = "already exists"


class FailedPrecondition(PysnapError):
    kind = "failed precondition"


class Unavailable(PysnapError):
    kind = "unavailable"


class OutOfRange(PysnapError):
    kind = "out of range"


class DataLoss(PysnapError):
    kind = "data loss"


class Unimplemented(PysnapError):
    kind = "not implemented"


class Unknown(PysnapError):
    kind = "unknown"
