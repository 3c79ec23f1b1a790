"""``pysnap install``: systemd units, config, containerd drop-in (and NRI launcher) on a node."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .. import install
from ..config import ConfigError


def run(args: argparse.Namespace) -> int:
    options = install.Options(
        root=args.prefix,
        containerd_version=args.containerd_version,
        components=tuple(c.strip() for c in args.components.split(",") if c.strip()),
        nri_mode=args.nri_mode,
        bin=args.bin,
    )
    try:
        plan = install.plan(options)
    except (install.InstallError, ConfigError) as exc:
        print(f"pysnap install: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    where = "" if options.root == Path("/") else f" under {options.root}"
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if not plan.changes:
        print(f"pysnap install: nothing to change{where}: already installed "
              f"(containerd {plan.containerd_version}, {', '.join(options.components)})")
        return 0
    if args.dry_run:
        for change in plan.changes:
            sys.stdout.write(change.diff())
        for change in plan.changes:
            print(f"would {change.summary()}" + (" (after a backup)" if change.backup else ""))
        print(f"pysnap install --dry-run: {len(plan.changes)} change(s) would be made{where}; nothing written")
        return 0
    try:
        done = install.apply(options.root, plan.changes)
    except OSError as exc:
        print(f"pysnap install: {exc}", file=sys.stderr)
        return 1
    for line in done:
        print(line)
    print(f"pysnap install: {len(plan.changes)} change(s) made{where}")
    _next_steps(options, plan)
    return 0


def _next_steps(options: install.Options, plan: install.Plan) -> None:
    units = [install.unit_name(c) for c in options.components
             if c != "nri" or options.nri_mode == "external"]
    touched_units = any(str(c.path).startswith(str(install.UNIT_DIR)) for c in plan.changes)
    live = options.root == Path("/") and os.path.isdir("/run/systemd/system")
    steps = []
    if touched_units:
        if live:
            result = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
            if result.returncode == 0:
                print("ran: systemctl daemon-reload")
            else:
                steps.append("systemctl daemon-reload")
        else:
            steps.append("systemctl daemon-reload")
    if any(c.kind == "remove" and c.path.name == install.unit_name("nri") for c in plan.changes):
        steps.append(f"systemctl stop {install.unit_name('nri')}   # disabled: only one pysnap NRI plugin may run")
    proxies = [u for u in units if "nri" not in u]
    if proxies:
        steps.append(f"systemctl restart {' '.join(proxies)}")
    steps.append("systemctl restart containerd   # reads the drop-in; running containers keep running")
    if install.unit_name("nri") in units:
        steps.append(f"systemctl restart {install.unit_name('nri')}")
    print("next steps" + ("" if live else " (on the node)") + ":")
    for step in steps:
        print(f"  {step}")
    print("then check the result with: pysnap doctor")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "install", help="install the systemd units, config and containerd drop-in (idempotent)",
        description="Write pysnap's systemd units (enabled with containerd), a default "
                    f"{install.CONFIG} if there is none, the containerd drop-in {install.DROPIN} and the "
                    f"imports line for it in {install.CONTAINERD_CONFIG} (backed up first). Running it again "
                    f"changes nothing. The units run {install.BIN}, which is linked to this pysnap. Settings come "
                    f"from ROOT{install.CONFIG} (the file the units read), not from --config.")
    parser.add_argument("--prefix", type=Path, default=Path("/"), metavar="ROOT",
                        help="install under this root directory instead of / (image builds, tests)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print a unified diff of every file that would change, and change nothing")
    parser.add_argument("--containerd-version", choices=install.CONTAINERD_VERSIONS,
                        help="containerd major version (default: asked from the containerd binary)")
    parser.add_argument("--with", dest="components", default=",".join(install.COMPONENTS), metavar="LIST",
                        help=f"comma-separated daemons to install: {','.join(install.COMPONENTS)} (default: all)")
    parser.add_argument("--nri-mode", choices=install.NRI_MODES, default="external",
                        help="external: a systemd unit connecting to containerd's NRI socket (default); "
                             f"preinstalled: a launcher in {install.NRI_PLUGIN_DIR} that containerd runs itself; "
                             "daemonset: neither, the plugin runs in Kubernetes (deploy/kubernetes), but "
                             "containerd's NRI is still enabled")
    parser.add_argument("--bin", type=Path,
                        help=f"the pysnap executable {install.BIN} should point at, as seen on the node "
                             "(default: the one running)")
    parser.set_defaults(func=run)
