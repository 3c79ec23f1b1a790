"""Protobuf helpers shared by the servicers."""
from __future__ import annotations

from google.protobuf import timestamp_pb2


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    """A Timestamp with nanosecond precision from nanoseconds since the epoch."""
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)
