"""``pysnap serve snapshotter|content|nri|all``: run the daemons."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from ..config import DEFAULT_CONFIG_PATH, Config
from . import with_overrides


def _config(args: argparse.Namespace) -> Config:
    config = Config.load(args.config)
    if args.daemon in ("snapshotter", "content"):
        config = with_overrides(config, args.daemon, root=args.root, address=args.address)
    if args.daemon == "nri":
        config = with_overrides(config, "nri", socket=args.socket, containerd_address=args.containerd_address)
        config = with_overrides(config, "snapshotter", root=args.snapshotter_root)
    return config


def run(args: argparse.Namespace) -> int:
    from ..daemons import run_daemons

    names = ("snapshotter", "content", "nri") if args.daemon == "all" else (args.daemon,)
    asyncio.run(run_daemons(_config(args), names, log_events=getattr(args, "log_events", False)))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run a daemon").add_subparsers(dest="daemon", required=True)
    for daemon, what in (("snapshotter", "overlayfs snapshotter"), ("content", "content store")):
        sub = serve.add_parser(daemon, help=f"{what} (containerd proxy plugin)")
        sub.add_argument("--root", type=Path, help=f"state directory (default /var/lib/pysnap/{daemon})")
        sub.add_argument("--address", type=Path, help=f"unix socket (default /run/pysnap/{daemon}.sock)")
    nri = serve.add_parser("nri", help="NRI plugin mounting images and pysnap snapshots into containers")
    nri.add_argument("--socket", type=Path, help="NRI socket (default /var/run/nri/nri.sock; ignored when "
                                                 "launched by containerd with NRI_PLUGIN_SOCKET)")
    nri.add_argument("--containerd-address", type=Path, help="containerd gRPC socket "
                                                             "(default /run/containerd/containerd.sock)")
    nri.add_argument("--snapshotter-root", type=Path, help="root of the pysnap snapshotter whose snapshots "
                                                           "may be mounted (default /var/lib/pysnap/snapshotter)")
    nri.add_argument("--log-events", action="store_true", help="subscribe to every NRI event and log each one")
    every = serve.add_parser("all", help="all three daemons in one process (small setups, the demo)")
    every.add_argument("--log-events", action="store_true", help="NRI plugin: log every NRI event")
    for sub in serve.choices.values():
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                         help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
        sub.set_defaults(func=run)
