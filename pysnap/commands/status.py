"""``pysnap status``: what the snapshotter and content roots hold, and which daemons answer."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from ..config import Config
from ..report import dump_json, human_bytes, human_seconds
from . import accept_config_option

DESCRIPTION = """\
Shows snapshots by kind, blobs and their bytes, open ingests (ref, offset/total, age,
idle time), the filesystems of both roots, and whether each daemon answers (gRPC health
of the snapshotter and content sockets, /healthz of the NRI plugin's metrics endpoint).
Reads the roots directly through read-only SQLite connections, so it works whether or
not the daemons run, and never disturbs them."""


def _filesystem(root: Path) -> dict:
    from snapshotter.kernel import filesystem_type

    path = Path(root)
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return {"type": filesystem_type(path), "total_bytes": usage.total, "used_bytes": usage.used,
            "free_bytes": usage.free}


def _grpc_daemon(address: Path, service: str) -> dict:
    from ..probes import grpc_health, probe_socket

    state = probe_socket(address)
    health = grpc_health(address, service) if state.accepts else ""
    return {"address": str(address), "reachable": state.accepts, "health": health,
            "error": "" if state.accepts else (state.error or ("missing" if not state.exists else ""))}


def _nri_daemon(config: Config) -> dict:
    from ..daemons import metrics_address
    from ..probes import http_get

    address = metrics_address(config, "nri")
    if not address:
        return {"address": "", "reachable": False, "health": "", "error": "metrics endpoint off"}
    status, body = http_get(address, "/healthz")
    return {"address": address, "reachable": status != 0, "health": body.strip() if status else "",
            "error": "" if status else body}


def _section(root: Path, summarize, du: bool) -> dict:
    section: dict = {"root": str(root), "present": False}
    try:
        section["filesystem"] = _filesystem(root)
    except OSError as exc:
        section["filesystem"] = {"error": exc.strerror or str(exc)}
    try:
        section.update(summarize(root))
        section["present"] = True
    except Exception as exc:  # RootError, permission denied, a damaged database: say so, show the rest
        section["error"] = str(exc)
    if du and section["present"]:
        from snapshotter.usage import disk_usage

        usage = disk_usage(Path(root))
        section["usage"] = {"bytes": usage.size, "inodes": usage.inodes}
    return section


def collect(config: Config, du: bool = False, now_ns: int | None = None) -> dict:
    from content import maintenance as content
    from snapshotter import maintenance as snapshots
    from ..doctor import SERVICES

    now_ns = time.time_ns() if now_ns is None else now_ns
    snap = _section(config.snapshotter.root, snapshots.summary, du)
    snap["daemon"] = _grpc_daemon(config.snapshotter.address, SERVICES["snapshotter"])
    cont = _section(config.content.root, lambda root: content.summary(root, now_ns), du)
    cont["daemon"] = _grpc_daemon(config.content.address, SERVICES["content"])
    return {"snapshotter": snap, "content": cont, "nri": {"daemon": _nri_daemon(config)}}


def _daemon_line(daemon: dict) -> str:
    if not daemon["address"]:
        return f"not checked ({daemon['error']})"
    if daemon["reachable"]:
        return f"{daemon['address']}: {daemon['health'] or 'answers'}"
    return f"{daemon['address']}: not answering ({daemon['error'] or 'refused'})"


def _root_line(section: dict) -> str:
    fs = section.get("filesystem", {})
    if "error" in fs:
        return f"{section['root']} ({fs['error']})"
    return (f"{section['root']} ({fs['type'] or 'unknown fs'}, {human_bytes(fs['free_bytes'])} free of "
            f"{human_bytes(fs['total_bytes'])})")


def render(report: dict) -> str:
    lines = []
    snap, cont = report["snapshotter"], report["content"]
    lines.append(f"snapshotter  {_root_line(snap)}")
    lines.append(f"  daemon     {_daemon_line(snap['daemon'])}")
    if snap["present"]:
        kinds = snap["snapshots"]
        lines.append(f"  snapshots  {snap['total']}: {kinds['committed']} committed "
                     f"({human_bytes(snap['committed_bytes'])}), {kinds['active']} active, {kinds['view']} view")
        if snap["orphan_directories"]:
            lines.append(f"  orphans    {snap['orphan_directories']} directories without a snapshot "
                         "(`pysnap gc` removes them)")
        if "usage" in snap:
            lines.append(f"  disk use   {human_bytes(snap['usage']['bytes'])}, {snap['usage']['inodes']} inodes")
    else:
        lines.append(f"  ({snap.get('error', 'not present')})")
    lines.append(f"content      {_root_line(cont)}")
    lines.append(f"  daemon     {_daemon_line(cont['daemon'])}")
    if cont["present"]:
        lines.append(f"  blobs      {cont['blobs']} ({human_bytes(cont['blob_bytes'])})"
                     + (f"; {cont['quarantined']} quarantined by fsck" if cont["quarantined"] else ""))
        ingests = cont["ingests"]
        lines.append(f"  ingests    {len(ingests)} open ({human_bytes(cont['ingest_bytes'])})")
        for ingest in ingests:
            total = human_bytes(ingest["total"]) if ingest["total"] else "?"
            ref = ingest["ref"] or f"(half-made: {ingest['directory']})"
            lines.append(f"    {ref}  {human_bytes(ingest['offset'])}/{total}  age {human_seconds(ingest['age_s'])}"
                         f"  idle {human_seconds(ingest['idle_s'])}")
        if "usage" in cont:
            lines.append(f"  disk use   {human_bytes(cont['usage']['bytes'])}, {cont['usage']['inodes']} inodes")
    else:
        lines.append(f"  ({cont.get('error', 'not present')})")
    lines.append("nri")
    lines.append(f"  daemon     {_daemon_line(report['nri']['daemon'])}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    report = collect(Config.load(args.config), du=args.du)
    if args.json:
        dump_json(report, sys.stdout)
    else:
        sys.stdout.write(render(report))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="counts, disk usage, ingests and daemons at a glance",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("--json", action="store_true", help="print the report as one JSON object")
    status.add_argument("--du", action="store_true",
                        help="also walk both roots for their real disk usage (slow on big roots)")
    accept_config_option(status)
    status.set_defaults(func=run)
