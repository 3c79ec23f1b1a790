"""``pysnap config containerd``: the config.toml snippet that wires pysnap into containerd."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import Config, reference_markdown
from ..containerd_config import PARTS, VERSIONS, containerd_snippet
from . import with_overrides


def run(args: argparse.Namespace) -> int:
    config = with_overrides(Config.load(args.config), "snapshotter", address=args.snapshotter_address,
                            root=args.snapshotter_root)
    config = with_overrides(config, "content", address=args.content_address)
    try:
        parts = tuple(p for p in args.plugins.split(",") if p)
        sys.stdout.write(containerd_snippet(args.version, config, parts))
    except ValueError as exc:
        print(f"pysnap: {exc}", file=sys.stderr)
        return 2
    return 0


def print_reference(_args: argparse.Namespace) -> int:
    sys.stdout.write(reference_markdown())
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="print configuration for other programs")
    targets = config.add_subparsers(dest="target", required=True)
    ctd = targets.add_parser("containerd", help="the config.toml snippet that wires pysnap in")
    ctd.add_argument("--version", required=True, choices=VERSIONS, help="containerd major version")
    ctd.add_argument("--snapshotter-address", type=Path, help="override the snapshotter socket path")
    ctd.add_argument("--snapshotter-root", type=Path, help="override the snapshotter root")
    ctd.add_argument("--content-address", type=Path, help="override the content store socket path")
    ctd.add_argument("--plugins", default=",".join(PARTS),
                     help=f"comma-separated parts to wire in: {', '.join(PARTS)} (default: all)")
    ctd.set_defaults(func=run)
    ref = targets.add_parser("reference", help="the configuration reference, as Markdown (docs/configuration.md)")
    ref.set_defaults(func=print_reference)
