"""What the operator commands report: doctor's checks and fsck's findings, as
plain data with a one-line text rendering and a JSON rendering each."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, TextIO


class Status(str, enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One ``pysnap doctor`` check: what was found and, unless OK, how to fix it."""

    name: str
    status: Status
    message: str
    advice: str = ""

    def line(self, width: int = 28) -> str:
        text = f"{self.status.value:<5} {self.name:<{width}} {self.message}"
        return f"{text} -- fix: {self.advice}" if self.advice and self.status is not Status.OK else text

    def as_json(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status.value, "message": self.message, "advice": self.advice}


ERROR = "error"      # an inconsistency: fsck exits 1 while it is there
WARNING = "warning"  # worth knowing (e.g. a stale ingest, gc material): reported, exit code unaffected


@dataclass
class Finding:
    """One ``pysnap fsck`` finding.

    ``fix`` says what ``--repair`` does about it ("" when it can't be repaired
    automatically; ``advice`` then says what to do).  ``evidence`` carries what
    the check saw (e.g. the digest a blob really has); ``identity`` the file
    identity a repair re-checks before acting, so that a file changed since it
    was checked is never touched.
    """

    component: str  # "content" | "snapshotter"
    problem: str    # a stable identifier, e.g. "corrupt-blob"
    subject: str    # the digest, snapshot name or directory name concerned
    path: str
    detail: str
    severity: str = ERROR
    fix: str = ""
    advice: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    identity: tuple = ()
    repaired: bool = False
    repair_error: str = ""

    @property
    def outstanding(self) -> bool:
        """An error that is still there (fsck's exit code)."""
        return self.severity == ERROR and not self.repaired

    def line(self) -> str:
        text = f"{self.severity.upper():<7} {self.component:<11} {self.problem:<20} {self.subject}: {self.detail}"
        if self.repaired:
            return f"{text} -- repaired ({self.fix})"
        if self.repair_error:
            return f"{text} -- NOT repaired: {self.repair_error}"
        if self.fix:
            return f"{text} -- --repair will {self.fix}"
        return f"{text} -- {self.advice}" if self.advice else text

    def as_json(self) -> dict[str, Any]:
        return {
            "component": self.component, "problem": self.problem, "subject": self.subject, "path": self.path,
            "detail": self.detail, "severity": self.severity, "fix": self.fix, "advice": self.advice,
            "evidence": self.evidence, "repaired": self.repaired, "repair_error": self.repair_error,
        }


def dump_json(data: Any, out: TextIO) -> None:
    json.dump(data, out, indent=2, sort_keys=False, default=str)
    out.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = max(0, int(s))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def counts_line(statuses: Iterable[Status]) -> str:
    statuses = list(statuses)
    return ", ".join(f"{sum(1 for s in statuses if s is status)} {status.value}"
                     for status in (Status.FAIL, Status.WARN, Status.OK))


@dataclass
class Removal:
    """Something ``pysnap gc`` (or ``fsck --repair``) removed, would remove, or could not remove."""

    component: str  # "content" | "snapshotter"
    what: str       # "snapshot-directory" | "ingest"
    name: str
    path: str
    reason: str
    bytes: int = 0
    removed: bool = False
    error: str = ""

    def line(self, dry_run: bool = False) -> str:
        if self.error:
            verb = "kept"
        else:
            verb = "would remove" if dry_run else ("removed" if self.removed else "kept")
        text = f"{verb:<12} {self.component:<11} {self.what:<18} {self.name} ({human_bytes(self.bytes)}): {self.reason}"
        return f"{text} -- {self.error}" if self.error else text

    def as_json(self) -> dict[str, Any]:
        return {"component": self.component, "what": self.what, "name": self.name, "path": self.path,
                "reason": self.reason, "bytes": self.bytes, "removed": self.removed, "error": self.error}
