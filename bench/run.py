"""`python -m bench.run [--quick] [--only snapshotter|content|nri]`: run the benchmarks, print and record them.

Everything runs under one temporary work directory (removed at the end, after unmounting whatever is left below
it); every daemon is started by this process and stopped by its pid.  Needs root and the provisioned toolchain
(scripts/provision.sh).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .common import LoopFilesystem, containerd_version, log, machine, remove_tree, toolchain

BENCHMARKS = ("snapshotter", "content", "nri")


@dataclass
class Context:
    quick: bool
    workdir: Path
    versions: tuple[str, ...]
    image: object = None  # bigimage.CachedImage
    image_ref: str = ""
    registry: object = None  # support.registry.Registry
    labels: dict[str, str] = field(default_factory=dict)

    def version_label(self, version: str) -> str:
        if version not in self.labels:
            self.labels[version] = containerd_version(version)
        return self.labels[version]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (about 4 minutes)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS,
                        help="run only this benchmark (repeatable); default: all")
    parser.add_argument("--versions", default="1.7,2", help="containerd versions, comma-separated (default 1.7,2)")
    parser.add_argument("--workdir-base", type=Path, default=Path("/var/tmp"),
                        help="where the temporary work directory (or the loop filesystem's image file) is made")
    parser.add_argument("--no-loop", action="store_true",
                        help="work directly on --workdir-base's filesystem instead of a fresh journaled ext4 on a "
                             "loop device (see common.LoopFilesystem for why that is the default)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return parser.parse_args(argv)


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if os.geteuid() != 0:
        print("bench: needs root (containerd, mounts)", file=sys.stderr)
        return 2
    selected = tuple(b for b in BENCHMARKS if not args.only or b in args.only)
    versions = tuple(v.strip() for v in args.versions.split(",") if v.strip())
    signal.signal(signal.SIGTERM, _terminate)
    args.workdir_base.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="pysnap-bench-", dir=args.workdir_base))
    loop = None
    rendered: dict[str, str] = {}
    failed: list[str] = []
    total = time.monotonic()
    try:
        if args.no_loop:
            workdir = top
        else:
            loop = LoopFilesystem(top / "fs.img", top / "fs", 16 << 30).__enter__()
            workdir = loop.mountpoint / "work"
            workdir.mkdir()
        ctx = Context(quick=args.quick, workdir=workdir, versions=versions)
        when = time.strftime("%Y-%m-%d %H:%M %Z")
        mode = "quick" if args.quick else "full"
        facts = machine(workdir, loop.describe() if loop else None)
        _run_all(args, ctx, selected, rendered, failed, when, mode, facts)
    finally:
        if loop is not None:
            loop.__exit__()
        remove_tree(top)
    if rendered and not args.no_write:
        path = report.write(rendered, facts, when)
        log(f"wrote {path}")
    log(f"total {time.monotonic() - total:.0f} s")
    return 1 if failed else 0


def _run_all(args, ctx: Context, selected, rendered, failed, when, mode, facts) -> None:
    workdir = ctx.workdir
    try:
        from support.registry import Registry

        ctx.registry = Registry(toolchain.require("PYSNAP_REGISTRY"), workdir / "registry").start()
        if {"snapshotter", "content"} & set(selected):
            from . import bigimage

            ctx.image = bigimage.build(0.25 if args.quick else 1.0)
            log(f"benchmark image: {ctx.image.describe()}")
            ctx.image_ref = ctx.registry.push(ctx.image, "bench/rootfs", "quick" if args.quick else "full")
            log(f"pushed {ctx.image_ref}")
        for name in selected:
            module = __import__(f"bench.{name}", fromlist=["run"])
            started = time.monotonic()
            load_before = os.getloadavg()[0]
            log(f"=== {name} ({mode}), load average {load_before:.2f}")
            try:
                section = module.run(ctx)
            except Exception:
                traceback.print_exc()
                log(f"=== {name} FAILED; its section of docs/benchmarks.md is left as it was")
                failed.append(name)
                continue
            seconds = time.monotonic() - started
            for table in section.tables:
                print("\n" + table.text(), flush=True)
            for finding in section.findings:
                print(f"note: {finding}")
            rendered[name] = report.render_section(section, when, mode, facts, seconds,
                                                   (load_before, os.getloadavg()[0]))
            log(f"=== {name} done in {seconds:.0f} s")
    finally:
        if ctx.registry is not None:
            ctx.registry.stop()
        remove_tree(workdir)


if __name__ == "__main__":
    sys.exit(main())
