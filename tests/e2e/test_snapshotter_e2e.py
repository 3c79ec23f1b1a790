"""pysnap's snapshotter behind real containerd 1.7.24 and 2.1.9, driven with plain `ctr` commands.

Each test states one behaviour.  They share one stack per containerd version (conftest.py) and run in file order;
the last one removes every image.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import time
import uuid
from dataclasses import fields, replace
from pathlib import Path

import grpc
import pytest

from support import images as img
from support.containerd import CtrError, unmount_all_under

pytestmark = pytest.mark.e2e

OVERLAYFS = "overlayfs"


# ------------------------------------------------------------------------------------------------ helpers

def snapshots_ls(stack, snapshotter: str) -> dict[str, tuple[str, str]]:
    """`ctr snapshots ls` as {key: (parent, kind)} (keys used here contain no blanks)."""
    out = stack.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()
    assert out and out[0].split() == ["KEY", "PARENT", "KIND"], out
    rows = {}
    for line in out[1:]:
        cols = line.split()
        if len(cols) == 2:
            cols = [cols[0], "", cols[1]]
        key, parent, kind = cols
        rows[key] = (parent, kind)
    return rows


def snapshot_info(stack, snapshotter: str, key: str) -> dict:
    return json.loads(stack.ctr("snapshots", "--snapshotter", snapshotter, "info", key).stdout)


def snapshot_usage(stack, snapshotter: str, *keys: str) -> dict[str, tuple[int, int]]:
    """`ctr snapshots usage -b` as {key: (size in bytes, inodes)}."""
    out = stack.ctr("snapshots", "--snapshotter", snapshotter, "usage", "-b", *keys).stdout.splitlines()
    assert out and out[0].split() == ["KEY", "SIZE", "INODES"], out
    return {key: (int(size), int(inodes)) for key, size, inodes in (line.split() for line in out[1:])}


def snapshot_dirs(root: Path) -> list[str]:
    d = root / "snapshots"
    return sorted(os.listdir(d)) if d.exists() else []


def create_snapshot(stack, snapshotter: str, verb: str, key: str, parent: str) -> str:
    """`ctr snapshots prepare|view KEY PARENT`, protected from containerd's GC; returns the key used.

    ctr labels prepared snapshots `containerd.io/gc.root` but not views, and any deletion (e.g. of a container by
    `ctr run --rm`) schedules a collection that may run seconds later and remove an unlabelled view (seen here).
    Label at once; should a collection win the race, start over with another key."""
    for attempt in range(3):
        name = f"{key}-{attempt}"
        stack.ctr("snapshots", "--snapshotter", snapshotter, verb, name, parent)
        label = stack.ctr("snapshots", "--snapshotter", snapshotter, "label", name, "containerd.io/gc.root=e2e",
                          check=False)
        if label.returncode == 0:
            return name
        assert "not found" in label.stderr, label.stderr
    raise AssertionError(f"{verb} {key}: garbage-collected three times in a row before it could be labelled")


def remove_snapshot(stack, snapshotter: str, key: str) -> None:
    """Clean-up that never hides the test's own failure: a snapshot already gone is fine."""
    proc = stack.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)
    assert proc.returncode == 0 or "not found" in proc.stderr, proc.stderr


def mount_snapshot(stack, snapshotter: str, key: str, target: Path) -> None:
    """Mount snapshot `key` at `target` on the host with the command `ctr snapshots mounts` prints."""
    target.mkdir(parents=True, exist_ok=True)
    command = stack.ctr("snapshots", "--snapshotter", snapshotter, "mounts", str(target), key).stdout.strip()
    argv = shlex.split(command)
    assert argv[:1] == ["mount"], command
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, f"{command}\n{proc.stderr}"


LAYER_OPTIONS = ("workdir=", "upperdir=", "lowerdir=")


def normalise_mount_command(command: str, root: Path) -> str:
    """Replace `<root>/snapshots/<id>` by ROOT/<n> (n = order of first appearance), so that the mount commands of
    two snapshotters with different roots and ids compare.  The configured overlay options (index=off, …) are put
    after the layer options: containerd 1.7 puts them first, 2.x last, and overlayfs does not care; pysnap uses
    2.x's order for both (docs/architecture.md)."""
    ids: dict[str, int] = {}

    def repl(m: re.Match) -> str:
        return f"ROOT/{ids.setdefault(m[0], len(ids))}"

    def reorder(m: re.Match) -> str:
        options = m[1].split(",")
        layers = [o for o in options if o.startswith(LAYER_OPTIONS)]
        return "-o " + ",".join(layers + [o for o in options if not o.startswith(LAYER_OPTIONS)])

    command = re.sub(r"-o (\S+)", reorder, command)
    return re.sub(re.escape(str(root)) + r"/snapshots/[^/:,\s]+", repl, command)


def tree_differences(expected: dict[str, img.Node], actual: dict[str, img.Node], limit: int = 40) -> list[str]:
    expected, actual = img.normalise_groups(expected), img.normalise_groups(actual)
    problems = [f"missing: /{p} ({expected[p].kind})" for p in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected: /{p} ({actual[p].kind})" for p in sorted(actual.keys() - expected.keys())]
    for p in sorted(expected.keys() & actual.keys()):
        want, got = expected[p], actual[p]
        for name in (f.name for f in fields(img.Node)):
            if getattr(want, name) != getattr(got, name):
                problems.append(f"/{p}: {name} expected {getattr(want, name)!r}, got {getattr(got, name)!r}")
    if len(problems) > limit:
        problems = problems[:limit] + [f"... {len(problems) - limit} more"]
    return problems


# The script a container runs to describe its root filesystem: one `S` line per path (stat), followed by
# `L <target>` for symlinks or `H <sha256>` for regular files; then its mountinfo.
INSPECT_SCRIPT = r"""
find / -xdev | while IFS= read -r p; do
  stat -c 'S %f %u %g %s %i %h %Y %n' "$p"
  if [ -L "$p" ]; then printf 'L %s\n' "$(readlink "$p")"
  elif [ -f "$p" ]; then set -- $(sha256sum "$p"); printf 'H %s\n' "$1"
  fi
done
echo MOUNTINFO
cat /proc/self/mountinfo
"""


def parse_inspection(output: str) -> tuple[dict[str, img.Node], set[str]]:
    """(tree as seen in the container, in the shape of Image.expected without xattrs; the mount points on its
    root filesystem)."""
    lines = output.splitlines()
    split = lines.index("MOUNTINFO")
    tree: dict[str, img.Node] = {}
    inode_names: dict[int, list[str]] = {}
    current = None
    for line in lines[:split]:
        tag, _, rest = line.partition(" ")
        if tag == "S":
            mode_hex, uid, gid, size, ino, nlink, mtime, name = rest.split(" ", 7)
            mode = int(mode_hex, 16)
            rel = name.lstrip("/")
            fmt = mode & 0o170000
            kind = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink"}.get(fmt, f"other:{fmt:o}")
            node = img.Node(kind, mode & 0o7777, int(uid), int(gid), mtime=None if rel == "" else int(mtime))
            if kind == "file":
                node = replace(node, size=int(size), nlink=int(nlink))
                if int(nlink) > 1:
                    inode_names.setdefault(int(ino), []).append(rel)
            tree[rel] = node
            current = rel
        elif tag == "L":
            tree[current] = replace(tree[current], target=rest)
        elif tag == "H":
            tree[current] = replace(tree[current], sha256=rest)
        else:
            raise AssertionError(f"unexpected line in the container's output: {line!r}")
    for ino, names in inode_names.items():
        for name in names:
            tree[name] = replace(tree[name], link_group=f"inode:{ino}")
    points = {line.split()[4].lstrip("/") for line in lines[split + 1:] if line.strip()} - {""}
    # Only mounts on the root filesystem itself hide parts of it (not those nested in /proc, /dev, ...).
    top_level = {p for p in points if not any(p.startswith(q + "/") for q in points)}
    return tree, top_level


def without_xattrs(tree: dict[str, img.Node]) -> dict[str, img.Node]:
    return {p: replace(n, xattrs=()) for p, n in tree.items()}


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def pulled(stack):
    """The multi-layer image pulled the way a user does it: CONTAINERD_SNAPSHOTTER=pysnap ctr images pull."""
    stack.ctr("images", "pull", "--plain-http", stack.refs.multilayer, env={"CONTAINERD_SNAPSHOTTER": "pysnap"})
    return stack.refs.multilayer


@pytest.fixture(scope="module")
def pulled_both(stack, pulled):
    """The same image also unpacked into the built-in overlayfs, by the same plain command."""
    stack.ctr("images", "pull", "--plain-http", pulled, env={"CONTAINERD_SNAPSHOTTER": OVERLAYFS})
    return pulled


# ------------------------------------------------------------------------------------------------ tests

def test_plain_ctr_pull_unpacks_into_pysnap(stack, pulled, test_images):
    chain = test_images.multilayer.chain_ids()
    listed = snapshots_ls(stack, "pysnap")
    expected = {key: (parent, "Committed") for parent, key in zip([""] + chain[:-1], chain)}
    assert {k: v for k, v in listed.items() if k in chain} == expected, listed
    assert set(listed) == set(chain), f"snapshots other than the image's chain: {listed}"

    dirs = snapshot_dirs(stack.snapshotter_root)
    assert len(dirs) == len(chain), f"{stack.snapshotter_root}/snapshots holds {dirs}"
    layers = [stack.snapshotter_root / "snapshots" / d / "fs" for d in dirs]
    assert all(fs.is_dir() for fs in layers), dirs
    # The layers' contents landed in those directories: busybox, the large file, a whiteout (0/0 char device).
    assert sum((fs / "bin" / "busybox").is_file() for fs in layers) == 1
    large = [fs / "t" / "big" / "large.bin" for fs in layers if (fs / "t" / "big" / "large.bin").exists()]
    assert [p.stat().st_size for p in large] == [img.LARGE_FILE_SIZE]
    whiteouts = [fs / "t" / "gone.txt" for fs in layers if (fs / "t" / "gone.txt").is_char_device()]
    assert len(whiteouts) == 1 and os.stat(whiteouts[0], follow_symlinks=False).st_rdev == 0


def test_plain_ctr_pull_still_unpacks_into_overlayfs(stack, pulled_both, test_images):
    chain = test_images.multilayer.chain_ids()
    listed = snapshots_ls(stack, OVERLAYFS)
    assert set(chain) <= set(listed), f"image not unpacked into overlayfs next to pysnap: {listed}"


# The built-in overlayfs runs the same checks as a control: it proves the expectations, so a failure with
# pysnap alone is pysnap's.
BOTH = pytest.mark.parametrize("snapshotter", ["pysnap", OVERLAYFS])


@BOTH
def test_ctr_run_sees_expected_tree(stack, pulled_both, test_images, snapshotter):
    name = f"e2e-run-{stack.version}-{uuid.uuid4().hex[:8]}"
    proc = stack.ctr("run", "--rm", "--snapshotter", snapshotter, pulled_both, name, "/bin/sh", "-c",
                     INSPECT_SCRIPT, timeout=120)
    seen, mountpoints = parse_inspection(proc.stdout)
    # Runtime mounts (/proc, /dev, /sys, /run) cover image directories: compare only what the image provides.
    expected = without_xattrs(test_images.multilayer.expected)
    assert mountpoints <= expected.keys(), f"mounts outside the image's directories: {mountpoints}"
    expected = {p: n for p, n in expected.items() if p not in mountpoints}
    seen = {p: n for p, n in seen.items() if p not in mountpoints}
    problems = tree_differences(expected, seen)
    assert not problems, "container's view differs from the image:\n" + "\n".join(problems)


@BOTH
def test_view_mounted_on_host_has_expected_tree_and_xattrs(stack, pulled_both, test_images, snapshotter):
    top = test_images.multilayer.chain_ids()[-1]
    key = create_snapshot(stack, snapshotter, "view", f"e2e-view-{uuid.uuid4().hex[:8]}", top)
    target = stack.workdir / "mnt" / key
    try:
        mount_snapshot(stack, snapshotter, key, target)
        try:
            problems = tree_differences(test_images.multilayer.expected, img.scan_tree(target))
        finally:
            unmount_all_under(target)
    finally:
        remove_snapshot(stack, snapshotter, key)
    assert not problems, "view differs from the image:\n" + "\n".join(problems)


def test_snapshots_ls_matches_overlayfs(stack, pulled_both):
    assert snapshots_ls(stack, "pysnap") == snapshots_ls(stack, OVERLAYFS)


def test_snapshots_info_matches_overlayfs(stack, pulled_both, test_images):
    for key in test_images.multilayer.chain_ids():
        ours, theirs = snapshot_info(stack, "pysnap", key), snapshot_info(stack, OVERLAYFS, key)
        for info in (ours, theirs):
            assert info.pop("Created") and info.pop("Updated"), info
        assert ours == theirs


def test_snapshots_usage_of_committed_layers_matches_overlayfs(stack, pulled_both, test_images):
    chain = test_images.multilayer.chain_ids()
    ours, theirs = snapshot_usage(stack, "pysnap", *chain), snapshot_usage(stack, OVERLAYFS, *chain)
    assert ours == theirs
    assert ours[chain[-1]][0] >= img.LARGE_FILE_SIZE, ours


def test_snapshots_mounts_match_overlayfs(stack, pulled_both, test_images):
    """Mount commands of an active snapshot, a one-parent view (bind) and a four-parent view (read-only overlay)
    are those of the built-in, up to root directory and snapshot ids."""
    chain = test_images.multilayer.chain_ids()
    suffix = uuid.uuid4().hex[:8]
    cases = [("prepare", f"e2e-mounts-active-{suffix}", chain[-1]),
             ("view", f"e2e-mounts-view1-{suffix}", chain[0]),
             ("view", f"e2e-mounts-view4-{suffix}", chain[-1])]
    commands: dict[str, list[str]] = {}
    for snapshotter, root in (("pysnap", stack.snapshotter_root), (OVERLAYFS, stack.overlayfs_root)):
        for verb, key, parent in cases:
            name = create_snapshot(stack, snapshotter, verb, key, parent)
            try:
                out = stack.ctr("snapshots", "--snapshotter", snapshotter, "mounts", "/target", name).stdout
            finally:
                remove_snapshot(stack, snapshotter, name)
            commands.setdefault(snapshotter, []).append(normalise_mount_command(out.strip(), root))
    differing = [f"{verb} {key}:\n  pysnap:    {ours}\n  overlayfs: {theirs}"
                 for (verb, key, _), ours, theirs in zip(cases, commands["pysnap"], commands[OVERLAYFS])
                 if ours != theirs]
    assert not differing, "mount commands differ from the built-in's:\n" + "\n".join(differing)


def test_snapshots_prepare_write_usage_commit_rm_match_overlayfs(stack, pulled_both, test_images):
    top = test_images.multilayer.chain_ids()[-1]
    suffix = uuid.uuid4().hex[:8]
    active, committed = f"e2e-active-{suffix}", f"e2e-committed-{suffix}"
    payload = img.large_file_data()[: 3 * 1024 * 1024 + 123]
    seen: dict[str, dict] = {}
    for snapshotter in ("pysnap", OVERLAYFS):
        s = seen.setdefault(snapshotter, {})
        stack.ctr("snapshots", "--snapshotter", snapshotter, "prepare", active, top)
        s["ls active"] = snapshots_ls(stack, snapshotter)[active]
        s["kind active"] = snapshot_info(stack, snapshotter, active)["Kind"]
        s["usage empty"] = snapshot_usage(stack, snapshotter, active)
        target = stack.workdir / "mnt" / f"{snapshotter}-{active}"
        mount_snapshot(stack, snapshotter, active, target)
        try:
            (target / "t" / "written.bin").write_bytes(payload)
            os.mkdir(target / "t" / "newdir")
            os.remove(target / "t" / "keep.txt")
        finally:
            unmount_all_under(target)
        s["usage written"] = snapshot_usage(stack, snapshotter, active)
        stack.ctr("snapshots", "--snapshotter", snapshotter, "commit", committed, active)
        s["ls committed"] = snapshots_ls(stack, snapshotter)[committed]
        s["usage committed"] = snapshot_usage(stack, snapshotter, committed)
        s["active after commit"] = active in snapshots_ls(stack, snapshotter)
        stack.ctr("snapshots", "--snapshotter", snapshotter, "rm", committed)
        s["after rm"] = committed in snapshots_ls(stack, snapshotter)
        s["info after rm"] = stack.ctr("snapshots", "--snapshotter", snapshotter, "info", committed,
                                       check=False).returncode
    assert seen["pysnap"] == seen[OVERLAYFS]
    assert seen["pysnap"]["usage written"][active][0] > len(payload)


def test_snapshots_rm_of_parent_refused_like_overlayfs(stack, pulled_both, test_images):
    base = test_images.multilayer.chain_ids()[0]
    errors = {}
    for snapshotter in ("pysnap", OVERLAYFS):
        with pytest.raises(CtrError) as exc:
            stack.ctr("snapshots", "--snapshotter", snapshotter, "rm", base)
        errors[snapshotter] = exc.value.stderr.replace(snapshotter, "SNAPSHOTTER").strip()
        assert base in snapshots_ls(stack, snapshotter)
    assert errors["pysnap"] == errors[OVERLAYFS]


def scrape(socket_path: Path, path: str = "/metrics") -> tuple[str, str]:
    """(status line, body) of an HTTP GET on a pysnap metrics endpoint (a unix socket)."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(socket_path))
        conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


def test_metrics_after_a_pull_count_the_snapshot_rpcs_containerd_made(stack, pulled):
    metrics = stack.daemon.address.with_name(stack.daemon.address.stem + "-metrics.sock")
    status, body = scrape(metrics)
    assert status.endswith("200 OK")
    for series in ('pysnap_rpc_requests_total{method="Prepare",code="OK"}',
                   'pysnap_rpc_requests_total{method="Commit",code="OK"}',
                   'pysnap_rpc_duration_seconds_bucket{method="Prepare",le="+Inf"}',
                   'pysnap_snapshots{kind="committed"}'):
        assert series in body, f"{series} missing from {metrics}:\n{body[:3000]}"
    assert scrape(metrics, "/healthz")[0].endswith("200 OK")


def test_the_grpc_health_service_reports_serving(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix://{stack.daemon.address}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "containerd.services.snapshots.v1.Snapshots"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_image_removal_leaves_no_snapshot_directory(stack, pulled, test_images):
    # A second image sharing the base layer, and a container run, so that GC has more than one chain to walk.
    stack.ctr("images", "pull", "--plain-http", stack.refs.busybox, env={"CONTAINERD_SNAPSHOTTER": "pysnap"})
    stack.ctr("run", "--rm", "--snapshotter", "pysnap", stack.refs.busybox,
              f"e2e-gc-{stack.version}-{uuid.uuid4().hex[:8]}", "/bin/true", timeout=120)
    assert snapshot_dirs(stack.snapshotter_root)

    for ref in stack.ctr("images", "ls", "-q").stdout.split():
        stack.ctr("images", "rm", "--sync", ref)

    deadline = time.monotonic() + 15
    while True:
        listed, dirs = snapshots_ls(stack, "pysnap"), snapshot_dirs(stack.snapshotter_root)
        if (not listed and not dirs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert listed == {}, f"snapshots left after image removal: {listed}"
    assert dirs == [], f"{stack.snapshotter_root}/snapshots not empty after GC and Cleanup: {dirs}"
    assert snapshots_ls(stack, OVERLAYFS) == {}
