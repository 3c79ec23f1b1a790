"""pysnap's content store (and snapshotter) behind real containerd 1.7.24 and 2.1.9, driven with plain `ctr` commands.

One stack per containerd version, shared by the module: `pysnap serve content`, `pysnap serve snapshotter`, and an
isolated containerd whose config holds `pysnap config containerd --version V ... --plugins snapshotter,content`
verbatim (which disables the built-in `io.containerd.content.v1.content`).  Each test states one behaviour; they run
in file order on the shared stack.

What containerd does, found by these tests (semantics.md B6/B7 explain the first two):
  * Labels never reach the backend: `ctr content ls` shows labels from containerd's metadata (bolt); pysnap only
    holds the bytes, so a pysnap restart must keep blobs, and the labels stay with containerd.
  * Image removal with `ctr images rm --sync` runs the collector at once; it lists pysnap's blobs and deletes every one
    no namespace references, then aborts ingests it does not track.
  * `ctr images export` writes tar headers without times (the exporter sets none), so two exports of the same image
    are byte-identical and the round trip is compared bit-exact.
  * A pull interrupted by SIGKILL of containerd resumes from pysnap's ingest offset, the same way on both versions
    (1.7: `ctr` itself downloads and writes through containerd's content API; 2.1: containerd's transfer service
    downloads): containerd keeps the ingest in its metadata, reopens pysnap's ingest under the same backend ref, and
    `content.Copy` seeks the HTTP reader to the offset pysnap reports, i.e. one `GET` with `Range: bytes=<offset>-`
    answered 206 for exactly the missing bytes; committed blobs are not requested again.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from pysnap._pb.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from support import images as img
from support.containerd import VERSIONS, Containerd, mounts_under, unmount_all_under
from support.pysnapd import PysnapDaemon
from support.registry import push_image
from support.toolchain import require

pytestmark = pytest.mark.e2e

SNAPSHOTTER = "pysnap"
BUILTIN_CONTENT_DIR = "io.containerd.content.v1.content"
BIG_LAYER_SIZE = 64 * 1024 * 1024
LAYERED_LARGE_FILE = 4 * 1024 * 1024
BIG_LAYER_SEED = 20250301
THROTTLE = 16 * 1024 * 1024  # bytes/s for the big layer while the kill is being aimed
KILL_AFTER = 8 * 1024 * 1024  # pysnap's ingest offset of the big layer at which containerd is killed


# ------------------------------------------------------------------------------------------------ images

def layered_image(busybox: str) -> img.Image:
    """The snapshotter tests' multi-layer image (whiteouts, opaque directories, hardlinks, xattrs, ...) with a 4 MiB
    random file instead of 64 MiB.  Reading a blob through containerd costs one Info and one Read RPC per 32 KiB
    (`ctr content get` and the exporter copy with io.Copy's 32 KiB buffer), so this module moves its one big layer
    only where the size matters: the interrupted pull."""
    large = random.Random(img.LARGE_FILE_SEED).randbytes(LAYERED_LARGE_FILE)
    return img.build_image(img.multilayer_layers(busybox, large), cmd=["/bin/sh"], compresslevels=[6, 6, 6, 1])


def resume_image(busybox: str) -> img.Image:
    """busybox + a small layer + one big (64 MiB) seeded-random layer, stored uncompressed in gzip (level 0) so that
    it builds fast and its blob is as big as the file."""
    big = random.Random(BIG_LAYER_SEED).randbytes(BIG_LAYER_SIZE)
    layers = [img.busybox_layer(busybox),
              [img.d("r"), img.f("r/small.txt", "a small layer fetched before the big one\n")],
              [img.d("r"), img.f("r/big.bin", big)]]
    return img.build_image(layers, cmd=["/bin/sh"], compresslevels=[6, 6, 0])


def second_image(busybox: str) -> img.Image:
    """busybox + one small layer: shares its base layer with the busybox image."""
    layers = [img.busybox_layer(busybox), [img.d("second"), img.f("second/hello.txt", "pulled after a restart\n")]]
    return img.build_image(layers, cmd=["/bin/sh"])


def image_blobs(image: img.Image) -> dict[str, bytes]:
    """Every blob of `image`, the manifest included, by digest."""
    blobs = {image.manifest_digest: image.manifest}
    blobs.update(image.blobs())
    return blobs


@dataclass
class ExtraRefs:
    layered: str
    layered_image: img.Image
    resume: str
    resume_image: img.Image
    second: str
    second_image: img.Image
    registry_host: str  # 127.0.0.1:PORT of the session's registry


@pytest.fixture(scope="module")
def extra_refs(refs) -> ExtraRefs:
    """The images only this module uses, pushed to the session's registry (on 127.0.0.1)."""
    busybox = require("PYSNAP_BUSYBOX")
    host = refs.busybox.split("/", 1)[0]
    layered, resume, second = layered_image(busybox), resume_image(busybox), second_image(busybox)
    push_image(f"http://{host}", layered, "e2e/content-layered")
    push_image(f"http://{host}", resume, "e2e/content-resume")
    push_image(f"http://{host}", second, "e2e/content-second")
    return ExtraRefs(layered=f"{host}/e2e/content-layered:latest", layered_image=layered,
                     resume=f"{host}/e2e/content-resume:latest", resume_image=resume,
                     second=f"{host}/e2e/content-second:latest", second_image=second, registry_host=host)


# ------------------------------------------------------------------------------------------------ stack

def stack_class(config: pytest.Config) -> type:
    """conftest.py's `Stack`, whose instances get the daemons' logs attached to failure reports (taken from the
    registered conftest plugin: `import conftest` is ambiguous with several conftest.py files)."""
    plugin = config.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))
    assert plugin is not None and hasattr(plugin, "Stack"), "tests/e2e/conftest.py not loaded"
    return plugin.Stack


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, refs):
    """pysnap as content store AND snapshotter of one isolated containerd (overrides conftest's `stack`)."""
    version = request.param
    workdir = tmp_path_factory.mktemp(f"content-e2e-{version}")
    content = PysnapDaemon(workdir / "content-root", workdir / "content.sock", workdir / "content.log",
                           service="content")
    snapshotter = PysnapDaemon(workdir / "pysnap-root", workdir / "pysnap.sock", workdir / "pysnap.log")
    containerd = Containerd(version, workdir / "containerd", snapshotter_address=snapshotter.address,
                            snapshotter_root=snapshotter.root, content_address=content.address)
    try:
        content.start()
        snapshotter.start()
        containerd.start()
        yield stack_class(request.config)(version, workdir, containerd, snapshotter, refs, content=content)
    finally:
        try:
            containerd.stop()
        finally:
            snapshotter.stop()
            content.stop()
            unmount_all_under(workdir)
    assert not mounts_under(workdir)
    assert content.returncode == 0, f"pysnap content exited {content.returncode} on SIGTERM:\n{content.log_tail()}"
    assert snapshotter.returncode == 0, f"pysnap exited {snapshotter.returncode} on SIGTERM:\n{snapshotter.log_tail()}"


def content_root(stack) -> Path:
    return stack.content.root


# ------------------------------------------------------------------------------------------------ helpers

def human_size(n: int) -> str:
    """go-units HumanSize, as `ctr content ls/active` print sizes: 4 significant digits, decimal units."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    size, i = float(n), 0
    while size >= 1000.0 and i < len(units) - 1:
        size /= 1000.0
        i += 1
    return f"{size:.4g}{units[i]}"


def ctr_bytes(stack, *args: str, timeout: float = 120.0) -> bytes:
    """`ctr ARGS` with binary stdout (Containerd.ctr decodes text)."""
    c = stack.containerd
    argv = [str(c.ctr_bin), "--address", str(c.address), "--namespace", "default", *args]
    proc = subprocess.run(argv, capture_output=True, env=c.env, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout


def ctr_popen(stack, *args: str, **kwargs) -> subprocess.Popen:
    c = stack.containerd
    argv = [str(c.ctr_bin), "--address", str(c.address), "--namespace", "default", *args]
    return subprocess.Popen(argv, env=c.env, start_new_session=True, **kwargs)


def content_ls(stack) -> dict[str, tuple[str, dict[str, str]]]:
    """`ctr content ls` as {digest: (printed size, labels)}.  Columns: DIGEST SIZE AGE LABELS (AGE has blanks)."""
    out = stack.ctr("content", "ls").stdout.splitlines()
    assert out and out[0].split() == ["DIGEST", "SIZE", "AGE", "LABELS"], out
    rows = {}
    for line in out[1:]:
        cols = line.split()
        labels: dict[str, str] = {}
        key = None
        # ctr joins `k=v` with commas, and values may hold commas (distribution sources list repositories).
        for part in ([] if cols[-1] == "-" else cols[-1].split(",")):
            if "=" in part:
                key, value = part.split("=", 1)
                labels[key] = value
            else:
                assert key is not None, line
                labels[key] += "," + part
        rows[cols[0]] = (cols[1], labels)
    return rows


def content_active(stack) -> dict[str, str]:
    """`ctr content active` as {ref: printed size}.  Columns: REF SIZE AGE."""
    out = stack.ctr("content", "active").stdout.splitlines()
    assert out and out[0].split() == ["REF", "SIZE", "AGE"], out
    return {cols[0]: cols[1] for cols in (line.split() for line in out[1:])}


def blobs_on_disk(root: Path) -> dict[str, Path]:
    """Files under <pysnap content root>/blobs/<alg>/<hex>, by digest."""
    found = {}
    blobs = root / "blobs"
    if blobs.is_dir():
        for alg in sorted(os.listdir(blobs)):
            for name in sorted(os.listdir(blobs / alg)):
                found[f"{alg}:{name}"] = blobs / alg / name
    return found


def ingests_on_disk(root: Path) -> dict[str, int]:
    """pysnap's ingest directories as {ref: bytes written so far}."""
    found = {}
    ingest = root / "ingest"
    if ingest.is_dir():
        for entry in os.listdir(ingest):
            try:
                found[(ingest / entry / "ref").read_text()] = (ingest / entry / "data").stat().st_size
            except FileNotFoundError:
                continue  # committed or aborted meanwhile
    return found


def files_under(top: Path) -> list[str]:
    if not top.exists():
        return []
    return sorted(str(Path(d, n).relative_to(top)) for d, _, names in os.walk(top) for n in names)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def backend_statuses(stack) -> dict[str, content_pb2.Status]:
    """ListStatuses asked of pysnap's socket directly (no namespace metadata, like containerd's GC)."""
    with grpc.insecure_channel(f"unix:{stack.content.address}") as channel:
        reply = content_pb2_grpc.ContentStub(channel).ListStatuses(content_pb2.ListStatusesRequest(), timeout=10)
    return {s.ref: s for s in reply.statuses}


def backend_blobs(stack) -> dict[str, int]:
    """List asked of pysnap's socket directly: {digest: size} of every blob it stores."""
    with grpc.insecure_channel(f"unix:{stack.content.address}") as channel:
        replies = content_pb2_grpc.ContentStub(channel).List(content_pb2.ListContentRequest(), timeout=10)
        return {info.digest: info.size for reply in replies for info in reply.info}


DISTRIBUTION_SOURCE = "containerd.io/distribution.source."


def without_sources(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if not k.startswith(DISTRIBUTION_SOURCE)}


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pull(stack, ref: str, timeout: float = 180.0) -> None:
    stack.ctr("images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref, timeout=timeout)


# ------------------------------------------------------------------------------------------------ registry proxy

@dataclass
class ProxiedRequest:
    method: str
    path: str
    range: str | None
    status: int = 0
    sent: int = 0  # body bytes passed on to the client
    error: str = ""

    @property
    def digest(self) -> str | None:
        m = re.search(r"/(?:blobs|manifests)/(sha256:[0-9a-f]{64})$", self.path)
        return m[1] if m else None


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_ProxyServer"

    def do_GET(self) -> None:
        self.server.owner.forward(self, body=True)

    def do_HEAD(self) -> None:
        self.server.owner.forward(self, body=False)

    def log_message(self, format: str, *args) -> None:
        pass


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: "SlowProxy"


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class SlowProxy:
    """A read-only HTTP/1.1 reverse proxy on 127.0.0.1 in front of the registry.  It records every request (method,
    path, Range header, status, body bytes sent) and sends the body of a blob in `throttled` at `rate` bytes/s."""

    upstream: str  # 127.0.0.1:PORT
    rate: float = THROTTLE
    throttled: set[str] = field(default_factory=set)
    requests: list[ProxiedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="slow-proxy", daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "SlowProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def take(self) -> list[ProxiedRequest]:
        """The requests recorded so far; the record starts again empty."""
        with self._lock:
            done, self.requests = self.requests, []
        return done

    def forward(self, handler: _ProxyHandler, body: bool) -> None:
        record = ProxiedRequest(handler.command, handler.path, handler.headers.get("Range"))
        with self._lock:
            self.requests.append(record)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
        upstream = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            upstream.request(handler.command, handler.path, headers=headers)
            resp = upstream.getresponse()
            record.status = resp.status
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            data = None
            if body and resp.getheader("Content-Length") is None:
                data = resp.read()
                out_headers.append(("Content-Length", str(len(data))))
            handler.send_response_only(resp.status, resp.reason)
            for k, v in out_headers:
                handler.send_header(k, v)
            handler.end_headers()
            if not body:
                return
            if data is not None:
                handler.wfile.write(data)
                record.sent = len(data)
                return
            slow = record.digest in self.throttled
            started = time.monotonic()
            while chunk := resp.read(64 * 1024):
                handler.wfile.write(chunk)
                record.sent += len(chunk)
                if slow:
                    ahead = record.sent / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            handler.wfile.flush()
        except (OSError, http.client.HTTPException) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            handler.close_connection = True
        finally:
            upstream.close()


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def pulled(stack, extra_refs):
    """The four-layer image pulled with a plain `ctr images pull --snapshotter pysnap`."""
    pull(stack, extra_refs.layered)
    return extra_refs.layered


# ------------------------------------------------------------------------------------------------ tests

def test_pull_stores_every_blob_in_pysnap_root_and_none_in_containerd(stack, pulled, extra_refs):
    expected = image_blobs(extra_refs.layered_image)
    on_disk = blobs_on_disk(content_root(stack))
    assert set(on_disk) == set(expected), f"{content_root(stack)}/blobs holds {sorted(on_disk)}"
    for digest, data in expected.items():
        path = content_root(stack) / "blobs" / "sha256" / digest.removeprefix("sha256:")
        assert path.read_bytes() == data, f"{path}: wrong bytes"
    builtin = stack.containerd.root / BUILTIN_CONTENT_DIR
    assert files_under(builtin) == [], f"containerd's own content store was used: {files_under(builtin)}"


def test_ctr_content_ls_lists_every_blob_with_its_size(stack, pulled, extra_refs):
    expected = image_blobs(extra_refs.layered_image)
    listed = content_ls(stack)
    assert set(listed) == set(expected), listed
    sizes = {digest: size for digest, (size, _labels) in listed.items()}
    assert sizes == {digest: human_size(len(data)) for digest, data in expected.items()}
    assert set(stack.ctr("content", "ls", "-q").stdout.split()) == set(expected)


def test_ctr_content_get_returns_exact_bytes(stack, pulled, extra_refs):
    for digest, data in image_blobs(extra_refs.layered_image).items():
        got = ctr_bytes(stack, "content", "get", digest)
        assert len(got) == len(data) and got == data, f"ctr content get {digest}: {len(got)} bytes, not the blob"


def test_ctr_content_active_shows_an_ingest_only_while_it_is_written(stack):
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
    digest = img.sha256_digest(data)
    ref = f"e2e-ingest-{uuid.uuid4().hex[:8]}"
    proc = ctr_popen(stack, "content", "ingest", "--expected-size", str(len(data)), "--expected-digest", digest,
                     ref, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = 1024 * 1024
        proc.stdin.write(data[:first])
        proc.stdin.flush()
        active = wait_until(lambda: (a := content_active(stack)).get(ref) == human_size(first) and a, 20,
                            what=f"`ctr content active` to show {ref} at {human_size(first)}")
        assert set(active) == {ref}, active
        # pysnap holds it under containerd's backend ref <namespace>/<sequence>/<ref> (semantics.md B7).
        backend = {r: s.offset for r, s in backend_statuses(stack).items() if r.endswith(f"/{ref}")}
        assert list(backend.values()) == [first] and next(iter(backend)).startswith("default/"), backend
        _out, err = proc.communicate(input=data[first:], timeout=60)
        assert proc.returncode == 0, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert content_active(stack) == {}
    assert ingests_on_disk(content_root(stack)) == {}
    assert digest in content_ls(stack)
    assert (content_root(stack) / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() == data


def test_export_import_export_is_bit_exact(stack, pulled, extra_refs):
    first, second = stack.workdir / "export-1.tar", stack.workdir / "export-2.tar"
    try:
        stack.ctr("images", "export", str(first), pulled)
        # --sync: the collector runs before import, so the import really writes the blobs through pysnap again.
        stack.ctr("images", "rm", "--sync", pulled)
        assert pulled not in stack.ctr("images", "ls", "-q").stdout.split()
        stack.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(first))
        assert pulled in stack.ctr("images", "ls", "-q").stdout.split()
        stack.ctr("images", "export", str(second), pulled)
        a, b = first.read_bytes(), second.read_bytes()
        assert len(a) == len(b) and hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), \
            f"exports differ: {len(a)} vs {len(b)} bytes"
        # And the export carries the image's blobs as they are in the registry.
        with tarfile.open(first) as tar:
            names = set(tar.getnames())
            for digest, data in image_blobs(extra_refs.layered_image).items():
                name = "blobs/sha256/" + digest.removeprefix("sha256:")
                assert name in names, sorted(names)
                assert tar.extractfile(name).read() == data
    finally:
        for path in (first, second):
            path.unlink(missing_ok=True)


def test_image_removal_deletes_blobs_from_pysnap_root_and_leaves_no_ingest(stack, pulled, extra_refs):
    assert image_blobs(extra_refs.layered_image).keys() <= blobs_on_disk(content_root(stack)).keys()
    for ref in stack.ctr("images", "ls", "-q").stdout.split():
        stack.ctr("images", "rm", "--sync", ref)
    wait_until(lambda: not blobs_on_disk(content_root(stack)), 20,
               what=f"the collector to empty {content_root(stack)}/blobs")
    assert stack.ctr("content", "ls", "-q").stdout.split() == []
    assert content_active(stack) == {}
    assert ingests_on_disk(content_root(stack)) == {}
    assert backend_statuses(stack) == {}


def test_pull_interrupted_by_killing_containerd_resumes_without_refetching(stack, extra_refs):
    image = extra_refs.resume_image
    big = image.layers[-1]
    small = set(image_blobs(image)) - {big.digest}
    root = content_root(stack)
    with SlowProxy(extra_refs.registry_host, throttled={big.digest}) as proxy:
        ref = extra_refs.resume.replace(extra_refs.registry_host, proxy.host, 1)
        ctr = ctr_popen(stack, "images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            def big_ingest() -> int:
                return max((n for r, n in ingests_on_disk(root).items() if r.endswith(f"layer-{big.digest}")),
                           default=0)

            wait_until(lambda: small <= blobs_on_disk(root).keys() and big_ingest() >= KILL_AFTER, 60,
                       what="the small blobs committed and the big layer part-written")
            os.kill(stack.containerd.proc.pid, signal.SIGKILL)
            stack.containerd.proc.wait(30)
            ctr.communicate(timeout=60)
        finally:
            if ctr.poll() is None:
                os.kill(ctr.pid, signal.SIGKILL)
                ctr.wait()
        try:
            assert ctr.returncode != 0, "the pull finished although containerd was killed"
            first = proxy.take()
            # What pysnap holds now: the small blobs, and the big layer's ingest at an offset short of its size.
            assert big.digest not in blobs_on_disk(root)
            statuses = {r: s for r, s in backend_statuses(stack).items() if r.endswith(f"layer-{big.digest}")}
            assert len(statuses) == 1, statuses
            (backend_ref, status), = statuses.items()
            offset = status.offset
            assert KILL_AFTER <= offset < big.size and status.total == big.size, status
            big_first = [r for r in first if r.method == "GET" and r.digest == big.digest]
            assert len(big_first) == 1 and big_first[0].sent < big.size, big_first
        finally:
            proxy.throttled.clear()
            stack.containerd.start()  # also when an assertion failed: later tests need the stack
        # containerd, restarted, still tracks the ingest and reads its offset from pysnap.
        active = content_active(stack)
        assert active.get(f"layer-{big.digest}") == human_size(offset), active

        stack.ctr("images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref, timeout=180)
        second = proxy.take()

    gets = [r for r in second if r.method == "GET"]
    refetched = sorted({r.digest for r in gets if r.digest in small})
    assert refetched == [], f"completed blobs downloaded again: {refetched}\n{gets}"
    big_second = [r for r in gets if r.digest == big.digest]
    assert [(r.range, r.status, r.sent) for r in big_second] == [(f"bytes={offset}-", 206, big.size - offset)], \
        big_second
    assert sha256_file(root / "blobs" / "sha256" / big.digest.removeprefix("sha256:")) == big.digest
    assert backend_ref not in backend_statuses(stack)
    assert ref in stack.ctr("images", "ls", "-q").stdout.split()
    snapshots = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout
    assert image.chain_ids()[-1] in snapshots, snapshots


def test_content_daemon_restart_between_pulls_keeps_blobs_and_labels(stack, extra_refs, test_images):
    pull(stack, stack.refs.busybox)
    busybox = image_blobs(test_images.busybox)
    labelled = test_images.busybox.layers[0].digest
    stack.ctr("content", "label", labelled, "pysnap-e2e/kept=across-restart")
    before, stored = content_ls(stack), backend_blobs(stack)
    assert busybox.keys() <= before.keys() and before.keys() <= stored.keys(), (before, stored)
    assert before[labelled][1].get("pysnap-e2e/kept") == "across-restart", before[labelled]

    stack.content.stop()
    assert stack.content.returncode == 0, f"pysnap content exited {stack.content.returncode} on SIGTERM"
    stack.content.start()

    assert backend_blobs(stack) == stored
    assert content_ls(stack) == before
    for digest, data in busybox.items():
        assert ctr_bytes(stack, "content", "get", digest) == data, digest

    # The second image shares busybox's base layer: containerd finds it in pysnap and fetches only the rest.
    pull(stack, extra_refs.second)
    after = content_ls(stack)
    second = image_blobs(extra_refs.second_image)
    assert before.keys() | second.keys() <= after.keys()
    for digest, (size, labels) in before.items():
        assert after[digest][0] == size, digest
        assert without_sources(after[digest][1]) == without_sources(labels), digest
        # The second pull may add its repository to the shared layer's distribution source (1.7 does, 2.1 does not).
        for key, repos in labels.items():
            if key.startswith(DISTRIBUTION_SOURCE):
                assert set(repos.split(",")) <= set(after[digest][1][key].split(",")), (key, after[digest])
    on_disk = blobs_on_disk(content_root(stack))
    for digest, data in {**busybox, **second}.items():
        assert on_disk[digest].read_bytes() == data, digest
    assert {stack.refs.busybox, extra_refs.second} <= set(stack.ctr("images", "ls", "-q").stdout.split())
