"""Logging: one line per event, journald-friendly, with the request id of the
RPC being served (``rid=…``) when there is one."""
from __future__ import annotations

import contextvars
import itertools
import logging
import os
import sys

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_ids = itertools.count(1)


def new_request_id() -> str:
    rid = f"{os.getpid():x}-{next(_ids):x}"
    request_id.set(rid)
    return rid


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.rid = f" rid={rid}" if rid else ""
        return True


def setup_logging(level: str = "info") -> None:
    # Under systemd the journal adds timestamps itself.
    fmt = "%(levelname)s %(name)s: %(message)s%(rid)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
