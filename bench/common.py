"""What every benchmark shares: the test-support import path, statistics, machine facts, small process helpers."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
_TESTS = REPO / "tests"
if str(_TESTS) not in sys.path:  # tests/support is imported as the package `support`, as the tests do
    sys.path.insert(0, str(_TESTS))

from support import toolchain  # noqa: E402
from support.containerd import Containerd  # noqa: E402
from support.pysnapd import PysnapDaemon  # noqa: E402

MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes per second)
MiB = 1 << 20


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ statistics

def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ------------------------------------------------------------------------------------------------ results

@dataclass
class Table:
    """One markdown table of a benchmark's section."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        for note in self.notes:
            lines += ["", note]
        return "\n".join(lines)

    def text(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        out = [self.title, "  ".join(c.ljust(w) for c, w in zip(self.columns, widths))]
        out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in self.rows]
        return "\n".join(out)


@dataclass
class Section:
    """The outcome of one benchmark: a few lines of method, then tables."""

    name: str  # snapshotter | content | nri
    heading: str
    method: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}"


# ------------------------------------------------------------------------------------------------ machine

def _meminfo_total() -> str:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / (1 << 20):.1f} GiB"
    return "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def disk_of(path: Path) -> str:
    """Filesystem and block device holding `path`, e.g. `ext4 on /dev/vda (256G, virtio, non-rotational)`."""
    proc = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0 or not proc.stdout.split():
        return "?"
    source, fstype = proc.stdout.split()[:2]
    details = []
    dev = Path(source).name
    sysblock = Path("/sys/class/block") / dev
    if sysblock.exists():
        try:
            sectors = int((sysblock / "size").read_text())
            details.append(f"{sectors * 512 / 1e9:.0f} GB")
        except (OSError, ValueError):
            pass
        queue = sysblock / "queue" if (sysblock / "queue").exists() else sysblock.resolve().parent / "queue"
        try:
            details.append("rotational" if (queue / "rotational").read_text().strip() == "1" else "non-rotational")
        except OSError:
            pass
        driver = sysblock / "device" / "driver"
        if driver.exists():
            details.append(driver.resolve().name)
    return f"{fstype} on {source}" + (f" ({', '.join(details)})" if details else "")


class LoopFilesystem:
    """A fresh journaled ext4 on a loop device (direct I/O) backed by a sparse file, mounted at `mountpoint`.

    Why: a filesystem without a journal (this project's CI VMs have one at /) refuses to reuse inodes freed in
    the last 60 s and scans past them (ext4 `recently_deleted()`), so a run that follows the previous run's clean-up
    spends seconds of kernel time in inode allocation, at random.  Node filesystems have journals."""

    def __init__(self, image: Path, mountpoint: Path, size: int):
        self.image, self.mountpoint, self.size = image, mountpoint, size
        self.device = ""

    def __enter__(self) -> "LoopFilesystem":
        with open(self.image, "wb") as fh:
            fh.truncate(self.size)
        try:
            # inode tables and journal initialised now, not by ext4lazyinit in the background during the runs
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(self.image)],
                           check=True, capture_output=True)
            self.device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(self.image)],
                                         check=True, capture_output=True, text=True).stdout.strip()
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", self.device, str(self.mountpoint)], check=True, capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from support.containerd import mounts_under, unmount_all_under

        if self.mountpoint.exists() and mounts_under(self.mountpoint):
            unmount_all_under(self.mountpoint)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True)
            self.device = ""
        self.image.unlink(missing_ok=True)
        if self.mountpoint.exists():
            shutil.rmtree(self.mountpoint, ignore_errors=True)

    def describe(self) -> str:
        return (f"ext4 with journal on {self.device} (loop, direct I/O, {self.size >> 30} GiB), backed by a file on "
                f"{disk_of(self.image.parent)}")


def containerd_version(version: str) -> str:
    bin_dir = Path(toolchain.require({"1.7": "PYSNAP_CONTAINERD_17", "2": "PYSNAP_CONTAINERD_21"}[version]))
    out = subprocess.run([str(bin_dir / "containerd"), "--version"], capture_output=True, text=True).stdout.split()
    return out[2] if len(out) >= 3 else "?"


def machine(workdir: Path, disk: str | None = None) -> dict[str, str]:
    return {
        "CPU": f"{os.cpu_count()} × {_cpu_model()} (nproc {len(os.sched_getaffinity(0))})",
        "memory": _meminfo_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "disk (work directory)": disk or disk_of(workdir),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "containerd": ", ".join(containerd_version(v) for v in ("1.7", "2")),
    }


# ------------------------------------------------------------------------------------------------ processes

def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sync_disks() -> None:
    """Write back dirty pages so that one timed run does not pay for the previous one's writes."""
    os.sync()


def content_daemon(root: Path, address: Path, log_path: Path) -> PysnapDaemon:
    """`pysnap serve content --root ROOT --address SOCK` (tests/support/pysnapd.py's PysnapDaemon)."""
    return PysnapDaemon(root, address, log_path, service="content")


def gc_sync(ctrd: Containerd, namespace: str = "default") -> None:
    """A synchronous garbage collection: create a throw-away lease and delete it with --sync."""
    lease = f"bench-gc-{uuid.uuid4().hex[:12]}"
    ctrd.ctr("leases", "create", "--id", lease, namespace=namespace)
    ctrd.ctr("leases", "rm", "--sync", lease, namespace=namespace, timeout=300)


def remove_tree(path: Path) -> None:
    """rmtree that first checks nothing is mounted below `path` (never delete through a mount)."""
    from support.containerd import unmount_all_under

    if path.exists():
        unmount_all_under(path)
        shutil.rmtree(path, ignore_errors=True)


def pid_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children) in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks
