"""pysnap's NRI image-volume plugin behind real containerd 1.7.24 and 2.1.9, driven through CRI as kubelet does.

One stack per containerd version, shared by the module: `pysnap serve snapshotter`, an isolated containerd with NRI
on its own socket and a local pause image as CRI sandbox image, and `pysnap serve nri` (external plugin) with a
config file that enables writable volumes, mounts under a directory of this run and never waits for an unpack
inside CreateContainer (so the retriable "being unpacked" path is always exercised).  Both pysnap daemons log to
the stack's pysnap.log, whose tail conftest.py attaches to failure reports.

The annotation contract is spelled out here on purpose (not imported from nri_bridge): these tests state it.
Every test removes its pods and then checks that nothing of the plugin is left (host mounts, snapshots, leases).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from support import images as img
from support.containerd import PYSNAP, VERSIONS, Containerd, mounts_under, unmount_all_under
from support.cri import CriClient, CriError, Pod
from support.processes import terminate
from support.pysnapd import PysnapDaemon
from support.registry import Registry
from support.toolchain import require

pytestmark = pytest.mark.e2e

POD_KEY = "volumes.pysnap.io/pod"
CONTAINER_KEY = "volumes.pysnap.io/container."  # + container name
NAMESPACE = "k8s.io"  # the CRI's containerd namespace, the only one NRI serves
SNAPSHOTTER = "pysnap"
DEEP_LAYERS = 128
SYNCED = "nri_bridge.plugin: synchronized:"  # the plugin's log line once Synchronize is answered


# ------------------------------------------------------------------------------------------------ images

@dataclass
class NriImages:
    pause: img.Image  # busybox sleeping forever: the CRI sandbox image, and the test containers' image
    volume: img.Image  # two small layers; pulled into pysnap at stack start
    lazy: img.Image  # pulled without unpacking into pysnap: the plugin unpacks it
    deep: img.Image  # DEEP_LAYERS layers, one file each


@dataclass
class NriRefs:
    pause: str
    volume: str
    lazy: str
    deep: str


def volume_layers(tag: str) -> list[list[img.Entry]]:
    return [
        [img.d("a"), img.f("a/one.txt", f"{tag}: a/one, layer 1\n"), img.d("b"), img.f("b/two.txt", f"{tag}: b/two\n"),
         img.f("top.txt", f"{tag}: top\n")],
        [img.d("a"), img.f("a/three.txt", f"{tag}: a/three, layer 2\n"), img.f("top.txt", f"{tag}: top, replaced\n")],
    ]


@pytest.fixture(scope="session")
def nri_images() -> NriImages:
    pause = img.build_image([img.busybox_layer(require("PYSNAP_BUSYBOX"))], cmd=["/bin/sleep", "infinity"])
    deep = [[img.d("v"), img.f(f"v/{i:03d}.txt", f"layer {i}\n")] for i in range(DEEP_LAYERS)]
    return NriImages(pause=pause, volume=img.build_image(volume_layers("volume"), cmd=["/bin/true"]),
                     lazy=img.build_image(volume_layers("lazy"), cmd=["/bin/true"]),
                     deep=img.build_image(deep, cmd=["/bin/true"], compresslevels=[1] * DEEP_LAYERS))


@pytest.fixture(scope="session")
def nri_refs(tmp_path_factory: pytest.TempPathFactory, nri_images: NriImages):
    """The images in a registry on 127.0.0.1 for the session."""
    with Registry(require("PYSNAP_REGISTRY"), tmp_path_factory.mktemp("nri-registry")) as registry:
        yield NriRefs(pause=registry.push(nri_images.pause, "nri-e2e/pause", "1"),
                      volume=registry.push(nri_images.volume, "nri-e2e/volume"),
                      lazy=registry.push(nri_images.lazy, "nri-e2e/lazy"),
                      deep=registry.push(nri_images.deep, "nri-e2e/deep"))


def expected_view(image: img.Image, subpath: str = "") -> dict[str, str]:
    """What a volume of `image` (at `subpath`) holds: {relative path: "dir" | sha256 of the file}."""
    prefix = subpath.strip("/")
    out = {}
    for path, node in image.expected.items():
        if prefix:
            if path != prefix and not path.startswith(prefix + "/"):
                continue
            path = path[len(prefix) + 1:] if path != prefix else ""
        out[path] = "dir" if node.kind == "dir" else node.sha256
    return out


# ------------------------------------------------------------------------------------------------ the stack

class NriPlugin:
    """`pysnap serve nri` as an external plugin of one containerd; `start` returns once it is synchronized."""

    def __init__(self, argv: list[str], log_path: Path):
        self.argv, self.log_path = argv, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _synced_count(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(SYNCED)
        except FileNotFoundError:
            return 0

    def start(self, timeout: float = 30.0) -> "NriPlugin":
        before = self._synced_count()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while self._synced_count() <= before:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pysnap serve nri exited with {self.proc.returncode} at start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pysnap serve nri not synchronized after {timeout}s")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL, by pid: no chance to clean anything up."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, timeout)


@dataclass
class NriSetup:
    cri: CriClient
    plugin: NriPlugin
    mount_root: Path
    refs: NriRefs
    images: NriImages


@pytest.fixture(scope="session")
def e2e_conftest(request: pytest.FixtureRequest):
    """tests/e2e/conftest.py as pytest loaded it: its Stack is reused here, so that its log hook attaches the
    daemons' logs to failures."""
    module = request.config.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))
    assert module is not None, "tests/e2e/conftest.py is not loaded"
    return module


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, e2e_conftest,
          nri_refs: NriRefs):
    """pysnap snapshotter + containerd (NRI on, local sandbox image) for one version; overrides conftest's."""
    version = request.param
    workdir = tmp_path_factory.mktemp(f"nri-e2e-{version}")
    daemon = PysnapDaemon(workdir / "pysnap-root", workdir / "pysnap.sock", workdir / "pysnap.log")
    daemon.start()
    containerd = Containerd(version, workdir / "containerd", snapshotter_address=daemon.address,
                            snapshotter_root=daemon.root, nri=True, sandbox_image=nri_refs.pause)
    try:
        containerd.start()
        yield e2e_conftest.Stack(version, workdir, containerd, daemon, nri_refs)
    finally:
        try:
            containerd.stop()
        finally:
            daemon.stop()
            unmount_all_under(workdir)
    assert not mounts_under(workdir)


@pytest.fixture(scope="module")
def nri(stack, nri_refs: NriRefs, nri_images: NriImages):
    """The images pulled into namespace k8s.io, `pysnap serve nri` running, a CRI client."""
    ctr = stack.containerd
    # The sandbox/container image goes into the CRI's snapshotter (the default overlayfs); the volume image into
    # pysnap, as a user would pre-pull it.
    ctr.ctr("images", "pull", "--plain-http", nri_refs.pause, namespace=NAMESPACE)
    ctr.ctr("images", "pull", "--plain-http", nri_refs.volume, namespace=NAMESPACE, snapshotter=SNAPSHOTTER)
    mount_root = stack.workdir / "nri-mounts"
    config = stack.workdir / "nri.toml"
    # unpack_wait_ms = 1: CreateContainer never waits for an unpack, so the retriable path is always taken.
    config.write_text(f"[nri]\nmount_root = {json.dumps(str(mount_root))}\nallow_writable = true\n"
                      "unpack_wait_ms = 1\n")
    plugin = NriPlugin([str(PYSNAP), "serve", "nri", "--config", str(config), "--socket", str(ctr.nri_socket),
                        "--containerd-address", str(ctr.address), "--snapshotter-root", str(stack.snapshotter_root)],
                       stack.daemon.log_path)
    plugin.start()
    cri = CriClient(ctr.address)
    try:
        yield NriSetup(cri, plugin, mount_root, nri_refs, nri_images)
    finally:
        try:
            for sandbox in cri.list_pod_sandboxes():
                cri.remove_pod(sandbox.id)
            wait_no_leftovers(stack, mount_root)
        finally:
            cri.close()
            plugin.stop()


class Pods:
    """Pods of one test, all removed (StopPodSandbox + RemovePodSandbox) when it ends."""

    def __init__(self, cri: CriClient, test_name: str):
        self.cri, self.test_name, self.made = cri, test_name, []

    def run(self, annotations: dict[str, str] | None = None) -> Pod:
        name = f"{self.test_name.removeprefix('test_')[:40]}-{uuid.uuid4().hex[:8]}".replace("_", "-")
        pod = self.cri.run_pod_sandbox(name, annotations=annotations)
        self.made.append(pod)
        return pod

    def remove_all(self) -> None:
        for pod in reversed(self.made):
            self.cri.remove_pod(pod.id)
        self.made.clear()


@pytest.fixture
def pods(stack, nri: NriSetup, request: pytest.FixtureRequest):
    if not nri.plugin.running:  # an earlier test failed while the plugin was down
        nri.plugin.start()
    made = Pods(nri.cri, request.node.originalname)
    yield made
    made.remove_all()
    # The plugin answers RemoveContainer first and cleans up right after; give it a moment.
    wait_no_leftovers(stack, nri.mount_root)


# ------------------------------------------------------------------------------------------------ helpers

def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def nri_snapshots(stack, container_id: str = "") -> list[str]:
    """Keys of the plugin's snapshots (`pysnap-nri/<container id>/<n>`) in pysnap, namespace k8s.io."""
    out = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", namespace=NAMESPACE).stdout.splitlines()
    prefix = f"pysnap-nri/{container_id}/" if container_id else "pysnap-nri/"
    return [line.split()[0] for line in out[1:] if line.split() and line.split()[0].startswith(prefix)]


def nri_leases(stack, container_id: str = "") -> list[str]:
    """The plugin's per-container leases (`pysnap-nri.<container id>`) in namespace k8s.io."""
    ids = stack.ctr("leases", "ls", "-q", namespace=NAMESPACE).stdout.split()
    return [i for i in ids if (i == f"pysnap-nri.{container_id}" if container_id else i.startswith("pysnap-nri."))]


def host_mounts(mount_root: Path, container_id: str = "") -> list[str]:
    return mounts_under(mount_root / "containers" / container_id if container_id else mount_root)


def leftovers(stack, mount_root: Path, container_id: str = "") -> dict[str, list[str]]:
    """What the plugin still holds for `container_id` (or for any container): {} when nothing."""
    found = {"host mounts": host_mounts(mount_root, container_id), "snapshots": nri_snapshots(stack, container_id),
             "leases": nri_leases(stack, container_id)}
    return {k: v for k, v in found.items() if v}


def wait_no_leftovers(stack, mount_root: Path, container_id: str = "", timeout: float = 15.0) -> None:
    """Wait until the plugin holds nothing for `container_id` (or any container); the error lists what is left."""
    try:
        wait_until(lambda: not leftovers(stack, mount_root, container_id), timeout,
                   f"the plugin to remove the volumes of {container_id or 'every container'}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left: {leftovers(stack, mount_root, container_id)}") from None


def volumes_annotation(*volumes: dict) -> str:
    return json.dumps(list(volumes))


# Lists a directory tree in the container: "D <path>" per directory, "F <sha256> <path>" per file.
LIST_SCRIPT = r"""
cd "$1" || exit 3
find . -type d | while IFS= read -r p; do echo "D $p"; done
find . -type f | while IFS= read -r p; do set -- $(sha256sum "$p"); echo "F $1 $2"; done
"""


def seen_view(cri: CriClient, container_id: str, target: str) -> dict[str, str]:
    """The tree at `target` inside the container, in the shape of expected_view."""
    result = cri.exec_sync(container_id, ["/bin/sh", "-c", LIST_SCRIPT, "sh", target])
    assert result.exit_code == 0, f"listing {target} failed ({result.exit_code}): {result.stderr}"
    out = {}
    for line in result.stdout.splitlines():
        tag, rest = line.split(" ", 1)
        if tag == "D":
            out[rest[2:] if rest != "." else ""] = "dir"
        else:
            digest, path = rest.split(" ", 1)
            out[path[2:]] = digest
    return out


def sh(cri: CriClient, container_id: str, script: str):
    return cri.exec_sync(container_id, ["/bin/sh", "-c", script])


def run_container(nri: NriSetup, pod: Pod, name: str, annotations: dict[str, str] | None = None) -> str:
    return nri.cri.run_container(pod, name, nri.refs.pause, annotations=annotations)


def remove_container(nri: NriSetup, container_id: str) -> None:
    nri.cri.stop_container(container_id)
    nri.cri.remove_container(container_id)


def create_retrying(nri: NriSetup, pod: Pod, name: str, timeout: float = 60.0) -> tuple[str, list[str]]:
    """CreateContainer retried while it fails with the plugin's retriable 'being unpacked' error, as kubelet
    retries a failed container; returns (container id, errors of the failed attempts)."""
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            return nri.cri.create_container(pod, name, nri.refs.pause), errors
        except CriError as exc:
            if "being unpacked" not in exc.details or time.monotonic() > deadline:
                raise
            errors.append(exc.details)
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ tests

def test_pod_volume_shows_image_files_read_only(stack, nri, pods):
    pod = pods.run({POD_KEY: volumes_annotation({"image": nri.refs.volume, "target": "/data"})})
    cid = run_container(nri, pod, "app")

    assert seen_view(nri.cri, cid, "/data") == expected_view(nri.images.volume)
    assert sh(nri.cri, cid, "cat /data/top.txt").stdout == "volume: top, replaced\n"
    write = sh(nri.cri, cid, "echo x > /data/new.txt")
    assert write.exit_code != 0 and "Read-only file system" in write.stderr, write
    change = sh(nri.cri, cid, "echo x >> /data/a/one.txt")
    assert change.exit_code != 0 and "Read-only file system" in change.stderr, change
    # The plugin's own view is in pysnap, held by the container's lease, mounted under mount_root.
    assert nri_snapshots(stack, cid) == [f"pysnap-nri/{cid}/0"]
    assert nri_leases(stack, cid) == [f"pysnap-nri.{cid}"]
    assert host_mounts(nri.mount_root, cid)


def test_container_annotation_applies_only_to_named_container(stack, nri, pods):
    pod = pods.run({CONTAINER_KEY + "alpha": volumes_annotation({"image": nri.refs.volume, "target": "/data"})})
    alpha = run_container(nri, pod, "alpha")
    beta = run_container(nri, pod, "beta")

    assert seen_view(nri.cri, alpha, "/data") == expected_view(nri.images.volume)
    probe = sh(nri.cri, beta, "[ -e /data ] && echo present || echo absent")
    assert probe.stdout == "absent\n", probe
    assert nri_snapshots(stack, alpha) and not nri_snapshots(stack, beta)
    assert not leftovers(stack, nri.mount_root, beta)


def test_writable_volume_accepts_writes_and_forgets_them_on_recreation(stack, nri, pods):
    pod = pods.run({POD_KEY: volumes_annotation({"image": nri.refs.volume, "target": "/data", "readonly": False})})
    first = run_container(nri, pod, "writer")
    write = sh(nri.cri, first, "echo written > /data/new.txt && echo more >> /data/a/one.txt && rm /data/b/two.txt"
                               " && cat /data/new.txt")
    assert (write.exit_code, write.stdout) == (0, "written\n"), write
    assert sh(nri.cri, first, "cat /data/a/one.txt").stdout == "volume: a/one, layer 1\nmore\n"
    remove_container(nri, first)
    wait_no_leftovers(stack, nri.mount_root, first)

    second = run_container(nri, pod, "writer")
    assert second != first
    assert seen_view(nri.cri, second, "/data") == expected_view(nri.images.volume)
    # Still writable, and the image itself was never touched.
    again = sh(nri.cri, second, "echo again > /data/new.txt && cat /data/new.txt")
    assert (again.exit_code, again.stdout) == (0, "again\n"), again


def test_subpath_mounts_only_that_directory(stack, nri, pods):
    pod = pods.run({POD_KEY: volumes_annotation({"image": nri.refs.volume, "target": "/data", "subpath": "a"})})
    cid = run_container(nri, pod, "app")

    seen = seen_view(nri.cri, cid, "/data")
    assert seen == expected_view(nri.images.volume, "a")
    assert set(seen) == {"", "one.txt", "three.txt"}


def test_removing_container_removes_mounts_view_and_lease(stack, nri, pods):
    pod = pods.run({POD_KEY: volumes_annotation({"image": nri.refs.volume, "target": "/data"},
                                                {"image": nri.refs.volume, "target": "/more", "subpath": "b"})})
    cid = run_container(nri, pod, "app")
    keep = run_container(nri, pod, "neighbour")
    assert nri_snapshots(stack, cid) == [f"pysnap-nri/{cid}/0", f"pysnap-nri/{cid}/1"]
    assert nri_leases(stack, cid) == [f"pysnap-nri.{cid}"]
    assert len(host_mounts(nri.mount_root, cid)) == 2

    remove_container(nri, cid)
    wait_no_leftovers(stack, nri.mount_root, cid)
    assert not (nri.mount_root / "containers" / cid).exists()
    # The other container of the pod keeps its own.
    assert len(nri_snapshots(stack, keep)) == 2 and len(host_mounts(nri.mount_root, keep)) == 2
    assert seen_view(nri.cri, keep, "/more") == expected_view(nri.images.volume, "b")


def test_orphan_removed_while_plugin_down_is_cleaned_up_after_restart(stack, nri, pods):
    pod = pods.run({POD_KEY: volumes_annotation({"image": nri.refs.volume, "target": "/data"})})
    orphan = run_container(nri, pod, "orphan")
    survivor = run_container(nri, pod, "survivor")
    assert leftovers(stack, nri.mount_root, orphan) and leftovers(stack, nri.mount_root, survivor)

    nri.plugin.kill()
    remove_container(nri, orphan)  # no plugin to tell: its volumes stay behind for now
    time.sleep(0.5)
    assert set(leftovers(stack, nri.mount_root, orphan)) == {"host mounts", "snapshots", "leases"}

    nri.plugin.start()  # returns once Synchronize was answered; clean-up follows it
    wait_no_leftovers(stack, nri.mount_root, orphan)
    assert not (nri.mount_root / "containers" / orphan).exists()
    # The live container is untouched and still reads its volume.
    assert len(nri_snapshots(stack, survivor)) == 1 and host_mounts(nri.mount_root, survivor)
    assert seen_view(nri.cri, survivor, "/data") == expected_view(nri.images.volume)


def test_forbidden_target_fails_create_container_naming_annotation_and_reason(stack, nri, pods):
    pod = pods.run({POD_KEY: volumes_annotation({"image": nri.refs.volume, "target": "/proc/x"})})
    with pytest.raises(CriError) as failed:
        nri.cri.create_container(pod, "app", nri.refs.pause)
    error = failed.value.details
    assert POD_KEY in error, error
    assert "/proc/x" in error and "forbidden" in error, error
    assert not nri.cri.list_containers(pod.id)
    assert not leftovers(stack, nri.mount_root)


def test_image_not_yet_unpacked_is_unpacked_by_the_plugin_on_retry(stack, nri, pods):
    ref = nri.refs.lazy
    stack.ctr("images", "pull", "--plain-http", ref, namespace=NAMESPACE)  # unpacked into overlayfs only
    top = nri.images.lazy.chain_ids()[-1]
    listed = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", namespace=NAMESPACE).stdout
    assert top not in listed, "the image is already unpacked into pysnap: nothing to test"

    pod = pods.run({POD_KEY: volumes_annotation({"image": ref, "target": "/data"})})
    cid, retriable = create_retrying(nri, pod, "app")
    nri.cri.start_container(cid)

    # The config makes the plugin answer at once: the first attempt fails, the unpack goes on in the background.
    assert retriable and all("being unpacked" in e for e in retriable), retriable
    assert seen_view(nri.cri, cid, "/data") == expected_view(nri.images.lazy)
    chain = nri.images.lazy.chain_ids()
    listed = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", namespace=NAMESPACE).stdout.split()
    assert set(chain) <= set(listed), f"the image's layers are not committed in pysnap: {listed}"


def test_image_of_128_layers_works_as_volume(stack, nri, pods):
    ref = nri.refs.deep
    stack.ctr("images", "pull", "--plain-http", ref, namespace=NAMESPACE, snapshotter=SNAPSHOTTER, timeout=300)
    pod = pods.run({POD_KEY: volumes_annotation({"image": ref, "target": "/deep"})})
    cid, _ = create_retrying(nri, pod, "app")
    nri.cri.start_container(cid)

    assert seen_view(nri.cri, cid, "/deep") == expected_view(nri.images.deep)
    assert sh(nri.cri, cid, "cat /deep/v/127.txt").stdout == "layer 127\n"
