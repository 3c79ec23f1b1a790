"""Benchmark 2 (issue 3): pysnap's content store against containerd's built-in local store.

pysnap can only be the content store with the built-in one disabled (the snippet does that), so each containerd
version runs as two isolated instances at once: one with its built-in store, one wired to `pysnap serve content`
by `pysnap config containerd --plugins content`.  Runs alternate between the two (A B B A A B ...).

  * ingest: `ctr content ingest --expected-size N --expected-digest D REF < FILE` of a random file (os.urandom,
    made once per run, in the page cache), i.e. ctr → containerd's content service → the store;
  * fetch: `ctr content fetch --plain-http REF` of the benchmark image (all blobs, no unpack) from the local
    registry.
Between runs: the blobs are deleted (`ctr content rm`), a synchronous GC runs, and the run waits until the store's
blob directory is empty, then `sync`s.  Physical limits are measured in the same run on the same filesystem:
sequential write of the same size in 1 MiB os.write calls followed by fsync, and hashlib sha256 over 1 MiB buffers
(one core) — both stores hash everything they ingest once and fsync on commit.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .common import (MB, Containerd, MiB, PysnapDaemon, Section, Table, content_daemon, fmt_ratio, gc_sync, log,
                     median, pid_cpu_seconds, ratio, sync_disks, wait_until)

BUILTIN = "built-in"
PYSNAP = "pysnap"
NAMESPACE = "default"


@dataclass
class Store:
    kind: str
    ctrd: Containerd
    daemon: PysnapDaemon | None = None

    @property
    def blob_dir(self) -> Path:
        if self.daemon is not None:
            return self.daemon.root / "blobs" / "sha256"
        return self.ctrd.root / "io.containerd.content.v1.content" / "blobs" / "sha256"

    def blobs(self) -> list[str]:
        return sorted(os.listdir(self.blob_dir)) if self.blob_dir.exists() else []

    def cpu(self) -> tuple[float, float]:
        assert self.ctrd.proc is not None
        daemon = pid_cpu_seconds(self.daemon.proc.pid) if self.daemon and self.daemon.proc else 0.0
        return daemon, pid_cpu_seconds(self.ctrd.proc.pid)


@dataclass
class Run:
    store: str
    workload: str
    seconds: float
    nbytes: int
    daemon_cpu: float
    containerd_cpu: float

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / MB


@dataclass
class VersionResult:
    version: str
    runs: list[Run] = field(default_factory=list)
    message_sizes: dict[str, dict[int, float]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ inputs & limits

def make_random_file(path: Path, size: int) -> str:
    """`size` bytes of os.urandom in 4 MiB chunks; returns the sha256 digest."""
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(4 * MiB, left))
            h.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


def sequential_write_fsync(directory: Path, size: int) -> float:
    """MB/s of writing `size` bytes in 1 MiB os.write calls to a new file, then fsync (file and directory)."""
    buf = os.urandom(MiB)
    path = directory / f"seqwrite-{uuid.uuid4().hex[:8]}"
    sync_disks()
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        left = size
        while left:
            left -= os.write(fd, buf[:min(MiB, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    seconds = time.perf_counter() - started
    path.unlink()
    return size / seconds / MB


def sha256_speed(size: int) -> float:
    buf = os.urandom(MiB)
    h = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(size // MiB):
        h.update(buf)
    return size / (time.perf_counter() - started) / MB


# ------------------------------------------------------------------------------------------------ message size

def lockstep_write(socket: Path, namespace: str | None, path: Path, size: int, digest: str, chunk: int) -> float:
    """MB/s of one Write stream sending `path` in `chunk`-byte WRITE messages, each sent only after the previous
    one was answered (as containerd's remote writer does), then COMMIT; the blob is left for the caller."""
    import queue

    import grpc

    from pysnap._pb.containerd.services.content.v1 import content_pb2 as cpb
    from pysnap._pb.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc

    outbox: queue.Queue = queue.Queue()

    def requests():
        while (message := outbox.get()) is not None:
            yield message

    ref = f"bench-lockstep-{uuid.uuid4().hex[:8]}"
    md = (("containerd-namespace", namespace),) if namespace else ()
    with grpc.insecure_channel(f"unix://{socket}", options=[("grpc.max_send_message_length", 64 << 20),
                                                            ("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = cpb_grpc.ContentStub(ch)
        with open(path, "rb") as fh:
            started = time.perf_counter()
            responses = stub.Write(requests(), metadata=md, timeout=900)
            offset = 0
            while offset < size:
                data = fh.read(chunk)
                outbox.put(cpb.WriteContentRequest(action=cpb.WRITE, ref=ref, total=size, offset=offset, data=data))
                reply = next(responses)
                offset = reply.offset
            outbox.put(cpb.WriteContentRequest(action=cpb.COMMIT, ref=ref, total=size, offset=offset,
                                               expected=digest))
            next(responses)
            outbox.put(None)
            seconds = time.perf_counter() - started
    return size / seconds / MB


def _direct_delete(socket: Path, digest: str) -> None:
    import grpc

    from pysnap._pb.containerd.services.content.v1 import content_pb2 as cpb
    from pysnap._pb.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc

    with grpc.insecure_channel(f"unix://{socket}") as ch:
        cpb_grpc.ContentStub(ch).Delete(cpb.DeleteContentRequest(digest=digest), timeout=60)


def message_size_runs(stores: list[Store], daemon: PysnapDaemon, path: Path, size: int, digest: str
                      ) -> dict[str, dict[int, float]]:
    """Lockstep Write streams of `path` in 32 KiB and 1 MiB messages: through each containerd, and straight to
    pysnap's socket.  {target: {chunk: MB/s}}."""
    out: dict[str, dict[int, float]] = {}
    for chunk in (32 << 10, 1 << 20):
        targets = [(f"{s.kind} via containerd", s, s.ctrd.address, NAMESPACE) for s in stores]
        targets.append(("pysnap direct", stores[-1], daemon.address, None))
        for name, store, socket, namespace in targets:
            _reset(store)
            out.setdefault(name, {})[chunk] = lockstep_write(socket, namespace, path, size, digest, chunk)
            if namespace is None:  # a blob containerd's metadata does not know: delete it at pysnap directly
                _direct_delete(socket, digest)
    for store in stores:
        _reset(store)
    return out


# ------------------------------------------------------------------------------------------------ runs

def _reset(store: Store) -> None:
    digests = store.ctrd.ctr("content", "ls", "-q", namespace=NAMESPACE).stdout.split()
    images = store.ctrd.ctr("images", "ls", "-q", namespace=NAMESPACE).stdout.split()
    for ref in images:
        store.ctrd.ctr("images", "rm", ref, namespace=NAMESPACE)
    if digests:
        store.ctrd.ctr("content", "rm", *digests, namespace=NAMESPACE, timeout=300)
    gc_sync(store.ctrd, NAMESPACE)
    try:
        wait_until(lambda: not store.blobs(), 120, f"{store.kind}'s blobs to be deleted", 0.2)
    except RuntimeError:
        raise RuntimeError(f"{store.kind} still holds {store.blobs()}") from None
    sync_disks()


def ingest(store: Store, path: Path, size: int, digest: str) -> Run:
    ctrd = store.ctrd
    argv = [str(ctrd.ctr_bin), "--address", str(ctrd.address), "--namespace", NAMESPACE, "content", "ingest",
            "--expected-size", str(size), "--expected-digest", digest, f"bench-ingest-{uuid.uuid4().hex[:8]}"]
    cpu = store.cpu()
    with open(path, "rb") as stdin:
        started = time.perf_counter()
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, text=True, env=ctrd.env, timeout=900)
        seconds = time.perf_counter() - started
    after = store.cpu()
    if proc.returncode != 0:
        raise RuntimeError(f"ctr content ingest into {store.kind} failed: {proc.stderr}")
    if digest.split(":")[1] not in store.blobs():
        raise RuntimeError(f"ingest into {store.kind}: {digest} is not in {store.blob_dir}")
    return Run(store.kind, "ingest", seconds, size, after[0] - cpu[0], after[1] - cpu[1])


def fetch(store: Store, ref: str, digests: list[str], nbytes: int) -> Run:
    cpu = store.cpu()
    started = time.perf_counter()
    store.ctrd.ctr("content", "fetch", "--plain-http", ref, namespace=NAMESPACE, timeout=900)
    seconds = time.perf_counter() - started
    after = store.cpu()
    missing = {d.split(":")[1] for d in digests} - set(store.blobs())
    if missing:
        raise RuntimeError(f"fetch into {store.kind}: blobs missing afterwards: {sorted(missing)}")
    return Run(store.kind, "fetch", seconds, nbytes, after[0] - cpu[0], after[1] - cpu[1])


def bench_version(version: str, workdir: Path, ctx, inputs: dict, runs: dict[str, int]) -> VersionResult:
    result = VersionResult(version)
    workdir.mkdir(parents=True)
    daemon = content_daemon(workdir / "pysnap-content", workdir / "content.sock", workdir / "pysnap-content.log")
    stores: list[Store] = []
    try:
        daemon.start()
        builtin = Store(BUILTIN, Containerd(version, workdir / "builtin"))
        stores.append(builtin)
        builtin.ctrd.start()
        pysnap = Store(PYSNAP, Containerd(version, workdir / "pysnap", content_address=daemon.address), daemon)
        stores.append(pysnap)
        pysnap.ctrd.start()
        ordered = [builtin, pysnap]
        nbytes = ctx.image.compressed_bytes + len(ctx.image.manifest) + len(ctx.image.config)
        file, size, digest = inputs["file"]
        for workload in ("ingest", "fetch"):
            # one untimed warm-up per store (ingest: of a small file), then alternating rounds
            for store in ordered:
                _reset(store)
                if workload == "ingest":
                    ingest(store, *inputs["warm-up"])
                else:
                    fetch(store, ctx.image_ref, ctx.image.digests(), nbytes)
            for round_ in range(runs[workload]):
                for store in (ordered if round_ % 2 == 0 else list(reversed(ordered))):
                    _reset(store)
                    if workload == "ingest":
                        run = ingest(store, file, size, digest)
                    else:
                        run = fetch(store, ctx.image_ref, ctx.image.digests(), nbytes)
                    log(f"containerd {version} {workload} into {store.kind}: {run.seconds:.2f} s, "
                        f"{run.mbps:.0f} MB/s (daemon CPU {run.daemon_cpu:.2f} s, containerd CPU "
                        f"{run.containerd_cpu:.2f} s)")
                    result.runs.append(run)
        small_file, small_size, small_digest = inputs["message-size"]
        result.message_sizes = message_size_runs(ordered, daemon, small_file, small_size, small_digest)
        log(f"containerd {version} lockstep Write streams (MB/s by message size): {result.message_sizes}")
    finally:
        for store in reversed(stores):
            store.ctrd.stop()
        daemon.stop()
    return result


def run(ctx) -> Section:
    size = (256 if ctx.quick else 1024) * MiB
    # pysnap ingests this file at ~20 MB/s here: two 1 GiB runs per store keep the benchmark in its time budget
    runs = {"ingest": 1 if ctx.quick else 2, "fetch": 1 if ctx.quick else 3}
    file, warm, small = ctx.workdir / "ingest.bin", ctx.workdir / "warm-up.bin", ctx.workdir / "message-size.bin"
    small_size = (64 if ctx.quick else 128) * MiB
    log(f"writing {size // MiB} MiB of os.urandom to {file}")
    inputs = {"file": (file, size, make_random_file(file, size)),
              "warm-up": (warm, 32 * MiB, make_random_file(warm, 32 * MiB)),
              "message-size": (small, small_size, make_random_file(small, small_size))}
    try:
        limits = {"write": [], "sha256": []}
        results = []
        for version in ctx.versions:
            limits["write"].append(sequential_write_fsync(ctx.workdir, size))
            limits["sha256"].append(sha256_speed(size))
            results.append(bench_version(version, ctx.workdir / f"content-{version}", ctx, inputs, runs))
        limits["write"].append(sequential_write_fsync(ctx.workdir, size))
        limits["sha256"].append(sha256_speed(size))
    finally:
        for path in (file, warm, small):
            path.unlink(missing_ok=True)
    return report(ctx, results, limits, size, runs, small_size)


def report(ctx, results: list[VersionResult], limits: dict[str, list[float]], size: int,
           runs: dict[str, int], small_size: int) -> Section:
    section = Section("content", "Content store: ingest and fetch throughput (issue 3)")
    section.method = [
        f"ingest: `ctr content ingest --expected-size --expected-digest` of a {size // MiB} MiB os.urandom file "
        "(page-cached) on stdin; fetch: `ctr content fetch --plain-http` (all blobs, no unpack) of the benchmark "
        f"image ({ctx.image.describe()}) from a local `docker-registry` on 127.0.0.1.",
        "Each containerd version runs twice at once: with its built-in local store, and with `pysnap serve content` "
        "as its only content store (built-in disabled by `pysnap config containerd`). "
        f"Median of {runs['ingest']} (ingest) and {runs['fetch']} (fetch) run(s) per store after one untimed "
        "warm-up each (ingest: of a 32 MiB file); runs alternate between the two. Between runs: "
        "`ctr content rm`, synchronous GC, wait for an empty blob directory, `sync`.",
        "MB/s = 10^6 bytes per second of wall time of the ctr command (fetch: compressed bytes of all blobs). "
        "Ratio = pysnap / built-in (target ≥ 0.95). CPU = seconds of CPU used during the run (medians).",
        "Message size: `ctr content ingest` hands containerd the file in 32 KiB Write messages (ctr copies from "
        "stdin with Go's io.Copy default buffer, as os.File implements WriterTo), and containerd's content service "
        "forwards each message to a proxy store as one round trip; a pull writes 1 MiB messages. The lockstep "
        "table replays a Write stream at both sizes with a Python client, through each containerd and straight "
        "to pysnap.",
        "Physical limits, measured in the same run on the work directory's filesystem: sequential write of "
        f"{size // MiB} MiB (1 MiB os.write calls, then fsync of file and directory) and hashlib sha256 of "
        f"{size // MiB} MiB in 1 MiB buffers on one core; median of {len(limits['write'])} measurements spread "
        "over the run.",
    ]
    table = Table("Throughput (MB/s, median)",
                  ["containerd", "workload", "built-in", "pysnap", "ratio", "built-in runs", "pysnap runs",
                   "pysnap daemon CPU s", "containerd CPU s (built-in / pysnap)"])
    for res in results:
        for workload in ("ingest", "fetch"):
            by = {s: [r for r in res.runs if r.workload == workload and r.store == s] for s in (BUILTIN, PYSNAP)}
            med = {s: median([r.mbps for r in by[s]]) for s in by}
            table.add(ctx.version_label(res.version), workload, f"{med[BUILTIN]:.0f}", f"{med[PYSNAP]:.0f}",
                      fmt_ratio(ratio(med[PYSNAP], med[BUILTIN])),
                      " ".join(f"{r.mbps:.0f}" for r in by[BUILTIN]), " ".join(f"{r.mbps:.0f}" for r in by[PYSNAP]),
                      f"{median([r.daemon_cpu for r in by[PYSNAP]]):.2f}",
                      f"{median([r.containerd_cpu for r in by[BUILTIN]]):.2f} / "
                      f"{median([r.containerd_cpu for r in by[PYSNAP]]):.2f}")
    section.tables.append(table)
    for res in results:
        for workload in ("ingest", "fetch"):
            med = {st: median([r.mbps for r in res.runs if r.workload == workload and r.store == st])
                   for st in (BUILTIN, PYSNAP)}
            value = ratio(med[PYSNAP], med[BUILTIN])
            section.findings.append(f"containerd {ctx.version_label(res.version)}, {workload}: ratio {value:.3f} — "
                                    f"target ≥ 0.95 {'met' if value >= 0.95 else 'missed'}.")
    sizes = Table(f"Write stream by message size (MB/s, one run each, {small_size // MiB} MiB): each message sent "
                  "after the previous one was answered, as containerd's remote writer does",
                  ["containerd", "message size", "built-in via containerd", "pysnap via containerd", "ratio",
                   "pysnap direct (no containerd)"])
    for res in results:
        ms = res.message_sizes
        for chunk in (32 << 10, 1 << 20):
            b, p, d = (ms.get(k, {}).get(chunk, float("nan")) for k in
                       (f"{BUILTIN} via containerd", f"{PYSNAP} via containerd", "pysnap direct"))
            sizes.add(ctx.version_label(res.version), f"{chunk >> 10} KiB", f"{b:.0f}", f"{p:.0f}",
                      fmt_ratio(ratio(p, b)), f"{d:.0f}")
    section.tables.append(sizes)
    phys = Table("Physical limits (MB/s)", ["measurement", "median", "all"])
    phys.add("sequential write + fsync", f"{median(limits['write']):.0f}",
             " ".join(f"{v:.0f}" for v in limits["write"]))
    phys.add("sha256 (hashlib, one core)", f"{median(limits['sha256']):.0f}",
             " ".join(f"{v:.0f}" for v in limits["sha256"]))
    section.tables.append(phys)
    return section
