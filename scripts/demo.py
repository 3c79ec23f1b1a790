#!/usr/bin/env python3
"""pysnap demo: containerd 2.1 on pysnap's snapshotter, content store and NRI plugin.

Everything runs in a private sandbox directory with its own sockets; the host's
containerd (if any) is never touched. Steps:

  1. build two small images and push them to a local registry on 127.0.0.1;
  2. start `pysnap serve all` (snapshotter + content store + NRI plugin);
  3. start containerd 2.1 wired to pysnap with `pysnap config containerd --version 2`;
  4. pull an image: blobs land in pysnap's content store, layers in its snapshotter;
  5. `ctr run --snapshotter pysnap` a container from it;
  6. through CRI (as kubelet would), run a pod whose annotation mounts a second
     image into the container at /data, via the NRI plugin;
  7. tear everything down (also on Ctrl-C or a failure).

Run it with `scripts/demo.sh` (which provisions the binaries first).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import images as img  # noqa: E402
from support.containerd import PYSNAP, Containerd, mounts_under, unmount_all_under  # noqa: E402
from support.cri import CriClient, CriError  # noqa: E402
from support.registry import Registry  # noqa: E402
from support.toolchain import require  # noqa: E402

VOLUME_ANNOTATION = "volumes.pysnap.io/pod"


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.step = 0
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        self.step += 1
        print(f"\n[{self.step}] {text}", flush=True)

    @staticmethod
    def show(text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"    {line}", flush=True)


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pysnap exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"{path} did not come up within {timeout}s")


def wait_for_log(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} did not appear in {path} within {timeout}s")
        time.sleep(0.1)


def run(demo: Demo, cleanup: contextlib.ExitStack) -> None:
    work = demo.workdir

    demo.say("Building two images and pushing them to a local registry on 127.0.0.1")
    busybox = require("PYSNAP_BUSYBOX")
    app = img.build_image([img.busybox_layer(busybox),
                           [img.d("etc"), img.f("etc/demo-release", "pysnap demo 1\n")]],
                          cmd=["/bin/sh"])
    data = img.build_image([[img.d("models"), img.f("models/README", "weights of a very small model\n")],
                            [img.d("models"), img.f("models/weights.bin", bytes(range(256)) * 64)]],
                           cmd=["/bin/true"])
    pause = img.build_image([img.busybox_layer(busybox)], cmd=["/bin/sleep", "infinity"])
    registry = Registry(require("PYSNAP_REGISTRY"), work / "registry").start()
    cleanup.callback(registry.stop)
    app_ref = registry.push(app, "demo/app", "1")
    data_ref = registry.push(data, "demo/model", "1")
    pause_ref = registry.push(pause, "demo/pause", "1")
    demo.show(f"{app_ref}  (busybox + one layer)\n{data_ref}  (two layers of 'model' files)\n"
              f"{pause_ref}  (busybox sleeping: the CRI sandbox image)")

    demo.say("Starting pysnap: snapshotter, content store and NRI plugin in one process (`pysnap serve all`)")
    snap_sock, content_sock = work / "pysnap" / "snapshotter.sock", work / "pysnap" / "content.sock"
    snap_root, content_root = work / "pysnap" / "snapshotter", work / "pysnap" / "content"
    containerd_dir = work / "containerd"
    config = work / "pysnap.toml"
    config.write_text("\n".join([
        "[snapshotter]", f"root = {json.dumps(str(snap_root))}", f"address = {json.dumps(str(snap_sock))}",
        "[content]", f"root = {json.dumps(str(content_root))}", f"address = {json.dumps(str(content_sock))}",
        "[nri]", f"socket = {json.dumps(str(containerd_dir / 'nri.sock'))}",
        f"containerd_address = {json.dumps(str(containerd_dir / 'containerd.sock'))}",
        f"mount_root = {json.dumps(str(work / 'pysnap' / 'nri'))}", "",
    ]))
    log_path = work / "pysnap.log"
    with open(log_path, "wb") as log:
        pysnap = subprocess.Popen([str(PYSNAP), "--config", str(config), "serve", "all", "--log-events"],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)

    def stop_pysnap() -> None:
        if pysnap.poll() is None:
            pysnap.terminate()
            try:
                pysnap.wait(30)
            except subprocess.TimeoutExpired:
                pysnap.kill()
                pysnap.wait(30)
    cleanup.callback(stop_pysnap)
    wait_for_socket(snap_sock, pysnap)
    wait_for_socket(content_sock, pysnap)
    demo.show(f"snapshotter on {snap_sock}\ncontent store on {content_sock}\nlog: {log_path}")

    demo.say("Starting containerd 2.1 wired to pysnap (`pysnap config containerd --version 2`)")
    containerd = Containerd("2", containerd_dir, snapshotter_address=snap_sock, snapshotter_root=snap_root,
                            content_address=content_sock, nri=True, sandbox_image=pause_ref)
    cleanup.callback(lambda: unmount_all_under(work))
    cleanup.callback(containerd.stop)
    containerd.start()
    demo.show(subprocess.run([str(PYSNAP), "config", "containerd", "--version", "2",
                              "--snapshotter-address", str(snap_sock), "--snapshotter-root", str(snap_root),
                              "--content-address", str(content_sock)],
                             capture_output=True, text=True, check=True).stdout)
    wait_for_log(log_path, "synchronized:")
    demo.show("the NRI plugin registered with containerd and synchronized")

    demo.say(f"CONTAINERD_SNAPSHOTTER=pysnap ctr images pull --plain-http {app_ref}")
    containerd.ctr("images", "pull", "--plain-http", app_ref, env={"CONTAINERD_SNAPSHOTTER": "pysnap"})
    demo.show(containerd.ctr("snapshots", "--snapshotter", "pysnap", "ls").stdout)
    blobs = sorted(p.name[:12] for p in (content_root / "blobs" / "sha256").iterdir())
    demo.show(f"blobs in pysnap's content store ({content_root}/blobs/sha256): {', '.join(blobs)}")

    demo.say("ctr run --rm --snapshotter pysnap: a container whose rootfs is a pysnap overlay")
    out = containerd.ctr("run", "--rm", "--snapshotter", "pysnap", app_ref, "demo-run",
                         "/bin/sh", "-c", "echo hello from a pysnap rootfs; cat /etc/demo-release; df -h / | tail -1",
                         timeout=120).stdout
    demo.show(out)

    demo.say(f"Mounting {data_ref} into a Kubernetes-style container through the NRI plugin")
    containerd.ctr("images", "pull", "--plain-http", pause_ref, namespace="k8s.io")
    containerd.ctr("images", "pull", "--plain-http", data_ref, namespace="k8s.io")
    annotation = json.dumps([{"image": data_ref, "target": "/data"}])
    demo.show(f"pod annotation {VOLUME_ANNOTATION}: {annotation}")
    cri = CriClient(containerd.address)
    cleanup.callback(cri.close)
    pod = cri.run_pod_sandbox("demo", annotations={VOLUME_ANNOTATION: annotation})
    cleanup.callback(lambda: cri.remove_pod(pod.id))
    deadline = time.monotonic() + 60
    while True:  # like kubelet: retry while the plugin unpacks the image in the background
        try:
            container = cri.create_container(pod, "app", pause_ref, command=["/bin/sleep", "3600"])
            break
        except CriError as exc:
            if "being unpacked" not in str(exc) or time.monotonic() > deadline:
                raise
            demo.show("the plugin is unpacking the image into pysnap; retrying like kubelet does")
            time.sleep(0.5)
    cri.start_container(container)
    result = cri.exec_sync(container, ["/bin/sh", "-c", "ls -l /data/models; cat /data/models/README; "
                                                       "touch /data/x 2>&1 || true"])
    demo.show(result.stdout + result.stderr)
    demo.show(f"host mount made by the plugin: {', '.join(mounts_under(work / 'pysnap' / 'nri')) or '-'}")

    demo.say("Removing the pod: the plugin unmounts the volume and drops its snapshot and lease")
    cri.remove_pod(pod.id)
    deadline = time.monotonic() + 15
    while mounts_under(work / "pysnap" / "nri") and time.monotonic() < deadline:
        time.sleep(0.1)
    left = mounts_under(work / "pysnap" / "nri")
    demo.show("nothing left mounted" if not left else f"still mounted: {left}")
    if left:
        raise RuntimeError("the NRI plugin left mounts behind")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the sandbox directory (logs) afterwards")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pysnap-demo-"))
    demo = Demo(workdir)
    print(f"pysnap demo — sandbox {workdir}")
    status = 1
    try:
        with contextlib.ExitStack() as cleanup:
            try:
                run(demo, cleanup)
                status = 0
            except KeyboardInterrupt:
                print("\ninterrupted: tearing down", flush=True)
                status = 130
            except Exception as exc:
                print(f"\ndemo failed: {exc}", flush=True)
                log = workdir / "pysnap.log"
                if log.exists():
                    print("---- last lines of pysnap.log", *log.read_text(errors="replace").splitlines()[-30:],
                          sep="\n")
            demo.say("Tearing down: pod, containerd, pysnap, registry")
    finally:
        leftover = mounts_under(workdir)
        if leftover:
            print(f"warning: mounts left under {workdir}: {leftover}")
            status = status or 1
        elif not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ndemo {'finished' if status == 0 else 'FAILED'} in {time.monotonic() - demo.started:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
