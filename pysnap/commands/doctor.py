"""``pysnap doctor``: check the node and print what to fix."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import Config
from ..containerd_config import DEFAULT_CONTAINERD_CONFIG
from ..report import counts_line, dump_json
from . import accept_config_option

DESCRIPTION = """\
Checks, without changing anything, that this node can run pysnap and that containerd
is wired to it: overlayfs in the kernel and its options (index, redirect_dir, metacopy,
userxattr), d_type on the roots' filesystems, containerd's version and config.toml
(config version, [proxy_plugins], the content store swap, the transfer service's
unpack_config on 2.x, NRI), and the daemons' sockets (reachable, mode 0660, owned by
root) and gRPC health.  One line per check: OK, WARN or FAIL, and for the last two what
to do.  Exit status 1 if any check FAILs, 0 otherwise."""


def run(args: argparse.Namespace) -> int:
    from ..doctor import exit_code, run_checks

    checks = run_checks(Config.load(args.config), args.containerd_config)
    if args.json:
        dump_json([c.as_json() for c in checks], sys.stdout)
    else:
        width = max(len(c.name) for c in checks) + 1
        for check in checks:
            print(check.line(width))
        print(counts_line(c.status for c in checks))
    return exit_code(checks)


def register(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser("doctor", help="check the kernel, containerd's config and the daemons; say what "
                                 "to fix", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    doctor.add_argument("--containerd-config", type=Path, default=DEFAULT_CONTAINERD_CONFIG,
                        help=f"containerd's config.toml (default {DEFAULT_CONTAINERD_CONFIG}); its imports are "
                             "followed")
    doctor.add_argument("--json", action="store_true", help="print a JSON list of {check, status, message, advice}")
    accept_config_option(doctor)
    doctor.set_defaults(func=run)
