"""``pysnap fsck``: verify blob digests and the snapshot metadata against the disk."""
from __future__ import annotations

import argparse
import sqlite3
import sys

from ..config import Config
from ..report import dump_json
from . import accept_config_option, duration

DESCRIPTION = """\
Content: hashes every blob and compares it with its digest (a progress bar on stderr
when it is a terminal); finds rows without files, files without rows, stale ingests.
Snapshotter: finds snapshot rows whose directory is missing, directories without a row
(orphans), active snapshots without their overlay work/ directory, broken parent chains.

Read-only unless --repair; reading is safe while the daemons run (read-only SQLite
connections: the daemons are never blocked).  --repair moves corrupted blobs to
<content root>/quarantine/ and drops their rows, drops rows of blobs whose files are
gone, records sound blob files that have no row, removes orphan snapshot directories
(not those still used by a mount) and recreates missing work/ directories.  It never
deletes a snapshot that has a row, nor any blob it has not proved corrupt.

Repairs and running daemons: every change is made under metadata.db's write lock (the
SQLite lock the daemons take for each of their own changes) after re-checking, under
that lock, what it acts on; directories are renamed aside before they are deleted, as
the snapshotter's own reaper does.  So snapshotter repairs are safe while it runs.
Content repairs are refused while the content daemon's socket answers: the daemon keeps
recently read blob metadata in memory and would go on serving what a repair changed
under it.  Stop it first (systemctl stop pysnap-content.service; containerd's pulls and
reads fail meanwhile), or pass --force and restart it afterwards.

Exit status: 0 nothing wrong (warnings such as stale ingests aside), 1 problems found
that are not (or could not be) repaired, 2 usage error."""


def run(args: argparse.Namespace) -> int:
    from content import maintenance as content
    from snapshotter import maintenance as snapshots

    from ..probes import socket_answers
    from ..progress import Progress

    config = Config.load(args.config)
    parts = ["snapshotter"] if args.snapshotter else ["content"] if args.content else ["snapshotter", "content"]
    max_age_ns = int(args.ingest_age * 1e9)
    findings, checked, errors = [], {}, []
    for part in parts:
        root = getattr(config, part).root
        if not root.exists():
            checked[part] = {"root": str(root), "present": False}
            continue
        module = snapshots if part == "snapshotter" else content
        checked[part] = {"root": str(root), "present": True}
        try:
            checked[part].update(module.summary(root))
        except (module.RootError, sqlite3.DatabaseError):
            pass  # check() says what is wrong
        try:
            if part == "content":
                found = content.check(root, ingest_max_age_ns=max_age_ns,
                                      meter=lambda n, size: Progress("verifying blobs", n, size))
            else:
                found = snapshots.check(root)
            if args.repair and part == "content" and not args.force and socket_answers(config.content.address):
                for finding in found:
                    if finding.fix:
                        finding.repair_error = (f"the content daemon is running ({config.content.address} answers): "
                                                "stop it first (systemctl stop pysnap-content.service), or pass "
                                                "--force and restart it afterwards")
            elif args.repair:
                module.repair(root, found)
        except module.RootError as exc:
            errors.append(f"{part}: {exc}")
            continue
        except sqlite3.DatabaseError as exc:
            errors.append(f"{part}: {root / 'metadata.db'}: {exc}: stop the daemon and restore it from a backup")
            continue
        findings += found
    outstanding = [f for f in findings if f.outstanding]
    if args.json:
        dump_json({"checked": checked, "findings": [f.as_json() for f in findings], "errors": errors,
                   "repaired": sum(f.repaired for f in findings), "outstanding": len(outstanding)}, sys.stdout)
    else:
        for finding in findings:
            print(finding.line())
        for error in errors:
            print(f"ERROR   {error}")
        print(_summary(checked, findings, outstanding, args.repair))
    return 1 if outstanding or errors else 0


def _summary(checked: dict, findings: list, outstanding: list, repair: bool) -> str:
    parts = []
    for part, info in checked.items():
        if not info["present"]:
            parts.append(f"{part}: {info['root']} does not exist")
        elif part == "content":
            parts.append(f"content: {info.get('blobs', '?')} blobs")
        else:
            parts.append(f"snapshotter: {info.get('total', '?')} snapshots")
    repaired = sum(f.repaired for f in findings)
    warnings = sum(1 for f in findings if f.severity == "warning")
    text = "; ".join(parts) + (f" -- {len(outstanding)} problem(s) outstanding, {repaired} repaired, "
                               f"{warnings} warning(s)")
    fixable = sum(1 for f in outstanding if f.fix and not f.repair_error)
    if fixable and not repair:
        text += f"; `pysnap fsck --repair` fixes {fixable}"
    return text


def register(commands: argparse._SubParsersAction) -> None:
    fsck = commands.add_parser("fsck", help="verify blob digests and snapshot metadata against the disk",
                               description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsck.add_argument("--repair", action="store_true", help="repair what can be repaired safely (see above)")
    fsck.add_argument("--json", action="store_true", help="print one JSON object: checked, findings, errors")
    which = fsck.add_mutually_exclusive_group()
    which.add_argument("--snapshotter", action="store_true", help="check only the snapshotter root")
    which.add_argument("--content", action="store_true", help="check only the content root")
    fsck.add_argument("--force", action="store_true",
                      help="repair content even while the content daemon runs (restart it afterwards)")
    fsck.add_argument("--ingest-age", type=duration, default=24 * 3600, metavar="DURATION",
                      help="an ingest untouched for longer is reported as stale (default 24h)")
    accept_config_option(fsck)
    fsck.set_defaults(func=run)
