"""A one-line progress bar on stderr for long operations (fsck hashing every blob).

Drawn only when the stream is a terminal; otherwise silent, so logs and pipes
stay clean.  Redraws at most ten times a second.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


class Progress:
    def __init__(self, label: str, total_items: int, total_bytes: int, stream: TextIO | None = None,
                 enabled: bool | None = None, clock=time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.label, self.total_items, self.total_bytes = label, total_items, total_bytes
        self.items = self.bytes = 0
        self._clock = clock
        self._started = clock()
        self._drawn = 0.0
        self._width = 0

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        self.bytes += nbytes
        self.items += items
        now = self._clock()
        if self.enabled and (now - self._drawn >= 0.1 or (items and self.items == self.total_items)):
            self._drawn = now
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        elapsed = max((self._clock() if now is None else now) - self._started, 1e-6)
        fraction = self.bytes / self.total_bytes if self.total_bytes else (
            self.items / self.total_items if self.total_items else 1.0)
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(fraction * WIDTH)
        bar = "#" * filled + "." * (WIDTH - filled)
        mb = self.bytes / 1e6
        return (f"{self.label} [{bar}] {self.items}/{self.total_items} "
                f"{mb:.1f}/{self.total_bytes / 1e6:.1f} MB {mb / elapsed:.1f} MB/s")

    def _draw(self, now: float) -> None:
        text = self.render(now)
        pad = " " * max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self._draw(self._clock())
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
