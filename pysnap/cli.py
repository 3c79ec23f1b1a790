"""The ``pysnap`` command."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .config import DEFAULT_CONFIG_PATH, Config, ConfigError
from .containerd_config import VERSIONS, containerd_snippet


def _setup_logging(level: str) -> None:
    # Under systemd the journal adds timestamps; one line per event either way.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def _load(args: argparse.Namespace) -> Config:
    config = Config.load(args.config)
    section = config.snapshotter
    overrides = {}
    if getattr(args, "root", None):
        overrides["root"] = args.root
    if getattr(args, "address", None):
        overrides["address"] = args.address
    if overrides:
        config = dataclasses.replace(config, snapshotter=dataclasses.replace(section, **overrides))
    return config


def _serve_snapshotter(args: argparse.Namespace) -> int:
    from snapshotter.daemon import run

    asyncio.run(run(_load(args).snapshotter))
    return 0


def _config_containerd(args: argparse.Namespace) -> int:
    config = Config.load(args.config)
    if args.snapshotter_address:
        config = dataclasses.replace(
            config, snapshotter=dataclasses.replace(config.snapshotter, address=args.snapshotter_address)
        )
    if args.snapshotter_root:
        config = dataclasses.replace(
            config, snapshotter=dataclasses.replace(config.snapshotter, root=args.snapshotter_root)
        )
    sys.stdout.write(containerd_snippet(args.version, config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pysnap", description="containerd proxy plugins in Python")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a daemon").add_subparsers(dest="daemon", required=True)
    snap = serve.add_parser("snapshotter", help="overlayfs snapshotter (containerd proxy plugin)")
    snap.add_argument("--root", type=Path, help="state directory (default /var/lib/pysnap/snapshotter)")
    snap.add_argument("--address", type=Path, help="unix socket (default /run/pysnap/snapshotter.sock)")
    snap.set_defaults(func=_serve_snapshotter)

    config = commands.add_parser("config", help="print configuration for other programs")
    config_targets = config.add_subparsers(dest="target", required=True)
    ctd = config_targets.add_parser("containerd", help="the config.toml snippet that wires pysnap in")
    ctd.add_argument("--version", required=True, choices=VERSIONS, help="containerd major version")
    ctd.add_argument("--snapshotter-address", type=Path, help="override the snapshotter socket path")
    ctd.add_argument("--snapshotter-root", type=Path, help="override the snapshotter root")
    ctd.set_defaults(func=_config_containerd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"pysnap: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
