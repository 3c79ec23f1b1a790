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


def _with_overrides(config: Config, section: str, **values: object) -> Config:
    """``config`` with the non-empty ``values`` replacing keys of ``section``."""
    values = {k: v for k, v in values.items() if v}
    if not values:
        return config
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})


def _serve_nri(args: argparse.Namespace) -> int:
    from nri_bridge.daemon import run

    config = _with_overrides(Config.load(args.config), "nri", socket=args.socket,
                             containerd_address=args.containerd_address)
    config = _with_overrides(config, "snapshotter", root=args.snapshotter_root)
    asyncio.run(run(config.nri, config.snapshotter.root, log_events=args.log_events))
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = _with_overrides(Config.load(args.config), args.daemon, root=args.root, address=args.address)
    if args.daemon == "snapshotter":
        from snapshotter.daemon import run
    else:
        from content.daemon import run
    asyncio.run(run(getattr(config, args.daemon)))
    return 0


def _config_containerd(args: argparse.Namespace) -> int:
    config = Config.load(args.config)
    config = _with_overrides(config, "snapshotter", address=args.snapshotter_address, root=args.snapshotter_root)
    config = _with_overrides(config, "content", address=args.content_address)
    try:
        parts = tuple(p for p in args.plugins.split(",") if p)
        sys.stdout.write(containerd_snippet(args.version, config, parts))
    except ValueError as exc:
        print(f"pysnap: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pysnap", description="containerd proxy plugins in Python")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a daemon").add_subparsers(dest="daemon", required=True)
    for daemon, what in (("snapshotter", "overlayfs snapshotter"), ("content", "content store")):
        sub = serve.add_parser(daemon, help=f"{what} (containerd proxy plugin)")
        sub.add_argument("--root", type=Path, help=f"state directory (default /var/lib/pysnap/{daemon})")
        sub.add_argument("--address", type=Path, help=f"unix socket (default /run/pysnap/{daemon}.sock)")
        sub.set_defaults(func=_serve)
    nri = serve.add_parser("nri", help="NRI plugin mounting images and pysnap snapshots into containers")
    nri.add_argument("--socket", type=Path, help="NRI socket (default /var/run/nri/nri.sock; ignored when "
                                                 "launched by containerd with NRI_PLUGIN_SOCKET)")
    nri.add_argument("--containerd-address", type=Path, help="containerd gRPC socket "
                                                             "(default /run/containerd/containerd.sock)")
    nri.add_argument("--snapshotter-root", type=Path, help="root of the pysnap snapshotter whose snapshots "
                                                           "may be mounted (default /var/lib/pysnap/snapshotter)")
    nri.add_argument("--log-events", action="store_true", help="subscribe to every NRI event and log each one")
    nri.set_defaults(func=_serve_nri)
    for sub in serve.choices.values():
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                         help=f"configuration file (default {DEFAULT_CONFIG_PATH})")

    config = commands.add_parser("config", help="print configuration for other programs")
    config_targets = config.add_subparsers(dest="target", required=True)
    ctd = config_targets.add_parser("containerd", help="the config.toml snippet that wires pysnap in")
    ctd.add_argument("--version", required=True, choices=VERSIONS, help="containerd major version")
    ctd.add_argument("--snapshotter-address", type=Path, help="override the snapshotter socket path")
    ctd.add_argument("--snapshotter-root", type=Path, help="override the snapshotter root")
    ctd.add_argument("--content-address", type=Path, help="override the content store socket path")
    ctd.add_argument("--plugins", default="snapshotter,content",
                     help="comma-separated parts to wire in: snapshotter, content (default: both)")
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
