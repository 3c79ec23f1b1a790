"""``pysnap gc``: remove what no metadata owns."""
from __future__ import annotations

import argparse
import sys
import time

from ..config import Config
from ..report import dump_json, human_bytes
from . import accept_config_option, duration

DESCRIPTION = """\
Removes snapshot directories that no snapshot row owns (new-*, stale-* and reaping-*
left by crashes, ID directories whose row is gone; not one still used by a mount), and
ingests untouched for longer than --ingest-age (and what an interrupted gc left).  Prints
each thing removed.  Snapshots and blobs that have metadata are never touched: containerd
removes those, through the daemons.

Safe while the daemons run: orphans are decided and renamed aside under metadata.db's
write lock, the SQLite lock the snapshotter takes whenever it creates or renames a
snapshot directory, exactly as its own reaper does; deletion happens after the lock is
released.  An ingest is re-checked right before it is renamed aside, so one resumed
meanwhile is kept; a writer still holding a removed ingest sees it aborted.

Exit status: 0 done (or nothing to do), 1 something could not be removed, 2 usage error."""


def run(args: argparse.Namespace) -> int:
    from content import maintenance as content
    from snapshotter import maintenance as snapshots

    config = Config.load(args.config)
    removals, errors = [], []
    if config.snapshotter.root.exists():
        try:
            removals += snapshots.remove_orphans(config.snapshotter.root, dry_run=args.dry_run)
        except snapshots.RootError as exc:
            errors.append(f"snapshotter: {exc}")
    if config.content.root.exists():
        try:
            content.open_metadata(config.content.root).close()  # a content root, not some other directory
            removals += content.remove_stale_ingests(config.content.root, max_age_ns=int(args.ingest_age * 1e9),
                                                     now_ns=time.time_ns(), dry_run=args.dry_run)
        except content.RootError as exc:
            errors.append(f"content: {exc}")
    failed = [r for r in removals if r.error]
    if args.json:
        dump_json({"dry_run": args.dry_run, "removed": [r.as_json() for r in removals], "errors": errors},
                  sys.stdout)
    else:
        for removal in removals:
            print(removal.line(args.dry_run))
        for error in errors:
            print(f"error        {error}")
        done = [r for r in removals if (r.removed or args.dry_run) and not r.error]
        verb = "would free" if args.dry_run else "freed"
        print(f"{len(done)} {'to remove' if args.dry_run else 'removed'}, {verb} "
              f"{human_bytes(sum(r.bytes for r in done))}" + (f"; {len(failed)} kept" if failed else ""))
    return 1 if failed or errors else 0


def register(commands: argparse._SubParsersAction) -> None:
    gc = commands.add_parser("gc", help="remove orphan snapshot directories and stale ingests",
                             description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    gc.add_argument("--json", action="store_true", help="print one JSON object: dry_run, removed, errors")
    gc.add_argument("--ingest-age", type=duration, default=24 * 3600, metavar="DURATION",
                    help="remove ingests untouched for longer than this (default 24h; e.g. 3600, 30m, 2d)")
    accept_config_option(gc)
    gc.set_defaults(func=run)
