"""Helpers shared by the snapshotter unit tests (importable as a plain module)."""
from __future__ import annotations

import itertools
import threading

from snapshotter.kernel import OverlayFeatures

#: A host (init user namespace) with a recent kernel whose overlay module has an ``index`` parameter.
HOST_FEATURES = OverlayFeatures(has_index_parameter=True, in_user_namespace=False, kernel=(6, 1))

#: 2023-11-14T22:13:20.123456789Z, with a non-zero nanosecond part on purpose.
EPOCH_NS = 1_700_000_000_123_456_789


class FakeClock:
    """A clock that only moves when told to (``tick``); callable like ``time.time_ns``."""

    def __init__(self, start: int = EPOCH_NS) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return self.now

    def tick(self, ns: int = 1_000_000_007) -> int:
        with self._lock:
            self.now += ns
            return self.now


class TickingClock:
    """Every reading is 1 µs later than the previous one (unique, strictly increasing)."""

    def __init__(self, start: int = EPOCH_NS) -> None:
        self._counter = itertools.count(start, 1000)
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return next(self._counter)
