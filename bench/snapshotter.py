"""Benchmark 1 (issue 2): pysnap's snapshotter against containerd's built-in overlayfs, in the same containerd.

Part A, pull+unpack: for each containerd version, one `pysnap serve snapshotter` and one isolated containerd wired
to it with `pysnap config containerd`; `ctr images pull --plain-http --snapshotter pysnap|overlayfs REF` of the
benchmark image from the local registry, rounds alternating which snapshotter goes first.  Before every run the
image is removed with `--sync`, a synchronous GC runs, and the run waits until no snapshot, snapshot directory or
blob is left, then `sync`s the disks.
  * cold: the content store is emptied between runs too (the registry's files stay in the page cache): the
    user's `ctr images pull` of an image the node does not have;
  * warm (full mode): the image and its blobs stay, only the snapshots are removed: the same command then only
    unpacks, which isolates the snapshotter's share.

Part B, RPC latency: a Python gRPC client on containerd's socket calls containerd's snapshots service (namespace
metadata `containerd-namespace`, every snapshot held by a lease like an unpack's) with snapshotter `pysnap` and
`overlayfs`, N cycles each of Prepare, Mounts, Stat, Update, Usage, Commit, View, List, Remove (×2), cycles
interleaved between the two.  The same cycle straight on pysnap's socket (no containerd) separates pysnap's own
time from containerd's proxy path.  A Stat of a missing key (answered by containerd's metadata, no snapshotter
call) gives the client + containerd floor.  (The direct calls go to a second pysnap daemon that no containerd
uses: containerd's GC removes every snapshot of its snapshotters that its metadata does not know.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from pysnap._pb.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

from .common import (REPO, Containerd, PysnapDaemon, Section, Table, fmt_ms, fmt_ratio, fmt_s, gc_sync, log, median,
                     percentile, pid_cpu_seconds, ratio, sync_disks, wait_until)

PYSNAP = "pysnap"
OVERLAYFS = "overlayfs"
SNAPSHOTTERS = (PYSNAP, OVERLAYFS)
RPCS = ("Prepare", "Mounts", "Stat", "Update", "Usage", "Commit", "View", "List", "Remove")
NAMESPACE = "default"


@dataclass
class PullRun:
    snapshotter: str
    mode: str  # cold | warm
    seconds: float
    pysnap_cpu: float
    containerd_cpu: float
    other_snapshots: int  # snapshots the pull created in the other snapshotter


@dataclass
class VersionResult:
    version: str
    pulls: list[PullRun] = field(default_factory=list)
    latencies: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # target -> rpc -> ns samples
    floor: list[int] = field(default_factory=list)  # Stat on bench/floor_server.py, ns


# ------------------------------------------------------------------------------------------------ helpers

def _snapshot_keys(ctrd: Containerd, snapshotter: str) -> list[str]:
    lines = ctrd.ctr("snapshots", "--snapshotter", snapshotter, "ls", namespace=NAMESPACE).stdout.splitlines()
    return [line.split()[0] for line in lines[1:] if line.split()]


def _overlay_dirs(ctrd: Containerd) -> list[str]:
    d = ctrd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _pysnap_dirs(daemon: PysnapDaemon) -> list[str]:
    d = daemon.root / "snapshots"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _blobs(ctrd: Containerd) -> list[str]:
    d = ctrd.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _leftovers(ctrd: Containerd, daemon: PysnapDaemon, keep_content: bool) -> dict[str, list[str]]:
    found = {f"{s} snapshots": _snapshot_keys(ctrd, s) for s in SNAPSHOTTERS}
    found["pysnap dirs"] = _pysnap_dirs(daemon)
    found["overlayfs dirs"] = _overlay_dirs(ctrd)
    if not keep_content:
        found["blobs"] = _blobs(ctrd)
    return {k: v for k, v in found.items() if v}


def _reset(ctrd: Containerd, daemon: PysnapDaemon, ref: str, keep_content: bool, chain: list[str]) -> None:
    """No snapshot left anywhere (and, unless keep_content, no image and no blob); then sync the disks."""
    if keep_content:
        for snapshotter in SNAPSHOTTERS:
            present = set(_snapshot_keys(ctrd, snapshotter))
            for key in reversed(chain):  # children first; once the top is gone, GC may take the rest first
                if key in present:
                    proc = ctrd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, namespace=NAMESPACE,
                                    check=False)
                    if proc.returncode != 0 and "not found" not in proc.stderr:
                        raise RuntimeError(f"ctr snapshots rm {key} failed: {proc.stderr}")
    elif ref in ctrd.ctr("images", "ls", "-q", namespace=NAMESPACE).stdout.split():
        ctrd.ctr("images", "rm", "--sync", ref, namespace=NAMESPACE, timeout=300)
    gc_sync(ctrd, NAMESPACE)
    try:
        wait_until(lambda: not _leftovers(ctrd, daemon, keep_content), 120, "a clean slate between runs", 0.2)
    except RuntimeError:
        raise RuntimeError(f"left after clean-up: {_leftovers(ctrd, daemon, keep_content)}") from None
    sync_disks()


def _timed_pull(ctrd: Containerd, daemon: PysnapDaemon, ref: str, snapshotter: str, mode: str,
                chain: list[str]) -> PullRun:
    assert daemon.proc is not None and ctrd.proc is not None
    cpu_p, cpu_c = pid_cpu_seconds(daemon.proc.pid), pid_cpu_seconds(ctrd.proc.pid)
    started = time.perf_counter()
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref, namespace=NAMESPACE, timeout=900)
    seconds = time.perf_counter() - started
    cpu_p, cpu_c = pid_cpu_seconds(daemon.proc.pid) - cpu_p, pid_cpu_seconds(ctrd.proc.pid) - cpu_c
    got = _snapshot_keys(ctrd, snapshotter)
    if not set(chain) <= set(got):
        raise RuntimeError(f"pull into {snapshotter} did not commit the image's chain: {got}")
    other = OVERLAYFS if snapshotter == PYSNAP else PYSNAP
    return PullRun(snapshotter, mode, seconds, cpu_p, cpu_c, len(_snapshot_keys(ctrd, other)))


# ------------------------------------------------------------------------------------------------ RPC latency

class SnapshotClient:
    """The snapshots API on one socket, timing every call into `samples[rpc]` (nanoseconds)."""

    def __init__(self, socket: Path, snapshotter: str, namespace: str | None, lease: str | None):
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.snapshotter = snapshotter
        md = []
        if namespace is not None:
            md.append(("containerd-namespace", namespace))
        if lease is not None:
            md.append(("containerd-lease", lease))
        self.md = tuple(md)
        self.samples: dict[str, list[int]] = {}
        self.record = True

    def _t(self, rpc: str, call, request):
        started = time.perf_counter_ns()
        result = call(request, metadata=self.md, timeout=60)
        if rpc == "List":
            result = list(result)
        elapsed = time.perf_counter_ns() - started
        if self.record:
            self.samples.setdefault(rpc, []).append(elapsed)
        return result

    def cycle(self, tag: str, base: str) -> None:
        s, sn = self.stub, self.snapshotter
        active, committed, view = f"bench-a-{tag}", f"bench-c-{tag}", f"bench-v-{tag}"
        self._t("Prepare", s.Prepare, pb.PrepareSnapshotRequest(snapshotter=sn, key=active, parent=base))
        self._t("Mounts", s.Mounts, pb.MountsRequest(snapshotter=sn, key=active))
        self._t("Stat", s.Stat, pb.StatSnapshotRequest(snapshotter=sn, key=active))
        label = "containerd.io/snapshot/bench"  # an inherited label: containerd passes it on to the snapshotter
        self._t("Update", s.Update, pb.UpdateSnapshotRequest(
            snapshotter=sn, info=pb.Info(name=active, labels={label: tag}),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{label}"])))
        self._t("Usage", s.Usage, pb.UsageRequest(snapshotter=sn, key=active))
        self._t("Commit", s.Commit, pb.CommitSnapshotRequest(snapshotter=sn, name=committed, key=active))
        self._t("View", s.View, pb.ViewSnapshotRequest(snapshotter=sn, key=view, parent=committed))
        self._t("List", s.List, pb.ListSnapshotsRequest(snapshotter=sn))
        self._t("Remove", s.Remove, pb.RemoveSnapshotRequest(snapshotter=sn, key=view))
        self._t("Remove", s.Remove, pb.RemoveSnapshotRequest(snapshotter=sn, key=committed))
        self._missing(tag)

    def _missing(self, tag: str) -> None:
        started = time.perf_counter_ns()
        try:
            self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=f"bench-missing-{tag}"),
                           metadata=self.md, timeout=60)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        else:
            raise RuntimeError("Stat of a missing key succeeded")
        if self.record:
            self.samples.setdefault("Stat (missing key)", []).append(time.perf_counter_ns() - started)

    def make_base(self, name: str) -> None:
        self.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=self.snapshotter, key=name + "-active"),
                          metadata=self.md, timeout=60)
        self.stub.Commit(pb.CommitSnapshotRequest(snapshotter=self.snapshotter, name=name, key=name + "-active"),
                         metadata=self.md, timeout=60)

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key), metadata=self.md,
                         timeout=60)

    def close(self) -> None:
        self.channel.close()


def floor_latency(workdir: Path, calls: int, warmup: int) -> list[int]:
    """Stat on bench/floor_server.py (grpc.aio + one thread-pool hop, nothing else), with the same client."""
    socket = workdir / "floor.sock"
    with open(workdir / "floor.log", "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "bench.floor_server", str(socket)], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: socket.exists() or proc.poll() is not None, 30, "the floor server's socket", 0.05)
        if proc.poll() is not None:
            raise RuntimeError(f"bench.floor_server exited with {proc.returncode}; see {workdir / 'floor.log'}")
        client = SnapshotClient(socket, PYSNAP, None, None)
        try:
            for i in range(warmup + calls):
                client.record = i >= warmup
                client._t("Stat", client.stub.Stat, pb.StatSnapshotRequest(key=f"floor-{i}"))
        finally:
            client.close()
        return client.samples["Stat"]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def rpc_latencies(ctrd: Containerd, direct: PysnapDaemon, cycles: int, warmup: int) -> dict[str, dict[str, list[int]]]:
    """`direct` must be a pysnap daemon no containerd uses: containerd's GC removes every snapshot of its
    snapshotters that its own metadata does not know."""
    lease = f"bench-rpc-{uuid.uuid4().hex[:8]}"
    channel = grpc.insecure_channel(f"unix://{ctrd.address}")
    leases = leases_pb2_grpc.LeasesStub(channel)
    md = (("containerd-namespace", NAMESPACE),)
    leases.Create(leases_pb2.CreateRequest(id=lease), metadata=md, timeout=60)
    clients = {
        "pysnap via containerd": SnapshotClient(ctrd.address, PYSNAP, NAMESPACE, lease),
        "overlayfs via containerd": SnapshotClient(ctrd.address, OVERLAYFS, NAMESPACE, lease),
        "pysnap direct": SnapshotClient(direct.address, PYSNAP, None, None),
    }
    base = f"bench-base-{uuid.uuid4().hex[:8]}"
    try:
        for client in clients.values():
            client.make_base(base)
        for i in range(warmup + cycles):
            for name, client in clients.items():
                client.record = i >= warmup
                try:
                    client.cycle(f"{i}-{uuid.uuid4().hex[:6]}", base)
                except grpc.RpcError as exc:
                    raise RuntimeError(f"{name}: cycle {i}: {exc.code().name}: {exc.details()}") from None
        for client in clients.values():
            client.remove(base)
        return {name: client.samples for name, client in clients.items()}
    finally:
        for client in clients.values():
            client.close()
        leases.Delete(leases_pb2.DeleteRequest(id=lease, sync=True), metadata=md, timeout=300)
        channel.close()


# ------------------------------------------------------------------------------------------------ driver

def bench_version(version: str, workdir: Path, ref: str, chain: list[str], runs: int, modes: tuple[str, ...],
                  cycles: int) -> VersionResult:
    result = VersionResult(version)
    workdir.mkdir(parents=True)
    daemon = PysnapDaemon(workdir / "pysnap-root", workdir / "pysnap.sock", workdir / "pysnap.log")
    daemon.start()
    ctrd = Containerd(version, workdir / "containerd", snapshotter_address=daemon.address,
                      snapshotter_root=daemon.root)
    try:
        ctrd.start()
        # Warm-up (untimed): one pull into each, so that no timed run pays for first-time effects
        # (registry files into the page cache, containerd's and pysnap's code paths).
        for snapshotter in SNAPSHOTTERS:
            _reset(ctrd, daemon, ref, False, chain)
            ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref, namespace=NAMESPACE,
                     timeout=900)
        for mode in modes:
            for round_ in range(runs):
                order = SNAPSHOTTERS if round_ % 2 == 0 else tuple(reversed(SNAPSHOTTERS))
                for snapshotter in order:
                    if mode == "warm" and ref not in ctrd.ctr("images", "ls", "-q").stdout.split():
                        ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref, timeout=900)
                    _reset(ctrd, daemon, ref, mode == "warm", chain)
                    run = _timed_pull(ctrd, daemon, ref, snapshotter, mode, chain)
                    log(f"containerd {version} {mode} pull into {snapshotter}: {run.seconds:.2f} s "
                        f"(pysnap CPU {run.pysnap_cpu:.2f} s, containerd CPU {run.containerd_cpu:.2f} s)")
                    result.pulls.append(run)
        _reset(ctrd, daemon, ref, False, chain)
        log(f"containerd {version}: snapshot RPC latency, {cycles} cycles")
        direct = PysnapDaemon(workdir / "direct-root", workdir / "direct.sock", workdir / "direct.log")
        direct.start()
        try:
            result.latencies = rpc_latencies(ctrd, direct, cycles, warmup=max(5, cycles // 10))
        finally:
            direct.stop()
        result.floor = floor_latency(workdir, cycles * 2, warmup=max(5, cycles // 10))
    finally:
        try:
            ctrd.stop()
        finally:
            daemon.stop()
    return result


def run(ctx) -> Section:
    runs = 1 if ctx.quick else 3
    modes = ("cold",) if ctx.quick else ("cold", "warm")
    cycles = 100 if ctx.quick else 200
    results = [bench_version(v, ctx.workdir / f"snapshotter-{v}", ctx.image_ref, ctx.image.chain_ids(), runs, modes,
                             cycles) for v in ctx.versions]
    return report(ctx, results, runs, modes, cycles)


def report(ctx, results: list[VersionResult], runs: int, modes: tuple[str, ...], cycles: int) -> Section:
    section = Section("snapshotter", "Snapshotter: pull+unpack and snapshot RPC latency (issue 2)")
    section.method = [
        f"Image: {ctx.image.describe()} (bench/bigimage.py), pushed to a local `docker-registry` on 127.0.0.1.",
        f"Pull: `ctr images pull --plain-http --snapshotter pysnap|overlayfs REF` in one containerd per version, "
        f"median of {runs} run(s) per cell after one untimed warm-up pull into each; rounds alternate which "
        "snapshotter goes first. Before each run: image removed with `--sync`, synchronous GC, wait until no "
        "snapshot, snapshot directory (or, when cold, blob) is left, `sync`.",
        "*cold*: content store emptied between runs (registry files stay in the page cache) — the whole "
        "`ctr images pull`; *warm*: image and blobs kept, only snapshots removed — the same command then only "
        "unpacks. Ratio = pysnap / overlayfs (target ≤ 1.05). CPU = seconds of CPU used during the run by "
        "the pysnap daemon and by containerd (medians).",
        f"RPC latency: Python gRPC client (pysnap's generated stubs) on containerd's socket, namespace "
        f"`{NAMESPACE}`, snapshots held by a lease; {cycles} cycles per target (after a warm-up), each "
        "Prepare (parent: a committed snapshot) → Mounts → Stat → Update (an inherited `containerd.io/snapshot/` "
        "label) → Usage → Commit → View → List → Remove ×2; cycles interleaved between targets. Through "
        "containerd, Remove only deletes containerd's metadata (the snapshotter's Remove runs later, in "
        "containerd's GC) and List calls the snapshotter's Stat once per snapshot. *pysnap direct*: the same "
        "calls on a second pysnap daemon's own socket (containerd's GC would remove snapshots it does not know "
        "from the first). *Stat (missing key)* via containerd is answered by containerd alone: the floor of client "
        "+ containerd. *floor*: the same client calling Stat on bench/floor_server.py, a grpc.aio server whose "
        "handler only hops to a thread pool and back, like pysnap's: the cost of Python gRPC itself here. "
        "Target: pysnap p99 ≤ 1 ms.",
    ]
    pulls = Table("Pull+unpack (seconds, median)",
                  ["containerd", "mode", "pysnap", "overlayfs", "ratio", "pysnap runs", "overlayfs runs",
                   "pysnap daemon CPU", "containerd CPU (pysnap / overlayfs)", "other snapshotter also unpacked"])
    for res in results:
        for mode in modes:
            by = {s: [r for r in res.pulls if r.mode == mode and r.snapshotter == s] for s in SNAPSHOTTERS}
            med = {s: median([r.seconds for r in by[s]]) for s in SNAPSHOTTERS}
            others = sorted({r.other_snapshots for s in SNAPSHOTTERS for r in by[s]})
            pulls.add(ctx.version_label(res.version), mode, fmt_s(med[PYSNAP]), fmt_s(med[OVERLAYFS]),
                      fmt_ratio(ratio(med[PYSNAP], med[OVERLAYFS])),
                      " ".join(fmt_s(r.seconds) for r in by[PYSNAP]),
                      " ".join(fmt_s(r.seconds) for r in by[OVERLAYFS]),
                      fmt_s(median([r.pysnap_cpu for r in by[PYSNAP]])),
                      f"{fmt_s(median([r.containerd_cpu for r in by[PYSNAP]]))} / "
                      f"{fmt_s(median([r.containerd_cpu for r in by[OVERLAYFS]]))}",
                      "no" if others == [0] else f"yes ({others} snapshots)")
    section.tables.append(pulls)
    for res in results:
        for mode in modes:
            med = {s: median([r.seconds for r in res.pulls if r.mode == mode and r.snapshotter == s])
                   for s in SNAPSHOTTERS}
            value = ratio(med[PYSNAP], med[OVERLAYFS])
            section.findings.append(f"containerd {ctx.version_label(res.version)}, {mode}: pull+unpack ratio "
                                    f"{value:.3f} — target ≤ 1.05 {'met' if value <= 1.05 else 'missed'}.")
        others = {r.other_snapshots for r in res.pulls}
        if others == {0}:
            section.findings.append(f"containerd {ctx.version_label(res.version)}: `ctr images pull --snapshotter X` "
                                    "unpacked into X only (no snapshot appeared in the other snapshotter).")
        via = res.latencies.get("pysnap via containerd", {})
        direct = res.latencies.get("pysnap direct", {})
        worst = max(RPCS, key=lambda rpc: percentile(via[rpc], 99)) if via else None
        if worst:
            section.findings.append(
                f"containerd {ctx.version_label(res.version)}: highest pysnap p99 through containerd: {worst} "
                f"{percentile(via[worst], 99) / 1e6:.2f} ms (direct: "
                f"{max(percentile(direct[r], 99) for r in RPCS) / 1e6:.2f} ms at worst; floor p99 "
                f"{percentile(res.floor, 99) / 1e6:.2f} ms) — target p99 ≤ 1 ms "
                f"{'met' if percentile(via[worst], 99) <= 1e6 else 'missed'}.")
    for res in results:
        lat = res.latencies
        t = Table(f"Snapshot RPC latency, containerd {ctx.version_label(res.version)} (ms; {cycles} calls each, "
                  f"Remove {2 * cycles})",
                  ["RPC", "pysnap p50", "pysnap p99", "overlayfs p50", "overlayfs p99", "ratio p50", "ratio p99",
                   "pysnap direct p50", "pysnap direct p99"])
        for rpc in (*RPCS, "Stat (missing key)"):
            p, o, d = (lat[k].get(rpc, []) for k in ("pysnap via containerd", "overlayfs via containerd",
                                                     "pysnap direct"))
            row = [rpc]
            for values in (p, o):
                row += [fmt_ms(percentile(values, 50) / 1e9), fmt_ms(percentile(values, 99) / 1e9)]
            row += [fmt_ratio(ratio(percentile(p, 50), percentile(o, 50))),
                    fmt_ratio(ratio(percentile(p, 99), percentile(o, 99)))]
            row += [fmt_ms(percentile(d, 50) / 1e9), fmt_ms(percentile(d, 99) / 1e9)]
            t.add(*row)
        if res.floor:
            t.add("floor: Stat on an empty grpc.aio server", "–", "–", "–", "–", "–", "–",
                  fmt_ms(percentile(res.floor, 50) / 1e9), fmt_ms(percentile(res.floor, 99) / 1e9))
        section.tables.append(t)
    return section
