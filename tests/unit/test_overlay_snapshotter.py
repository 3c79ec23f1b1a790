"""Specification of the overlayfs snapshotter's domain core (no gRPC).

Reference: /work/shared/reference/semantics.md section A (containerd's built-in
``overlayfs`` snapshotter).  pysnap deliberately differs in: empty keys and keys
with a ``..`` segment are InvalidArgument, filter parse errors are
InvalidArgument, List/Cleanup on a fresh store return empty/OK, directories are
deleted in the background by the DirectoryReaper, and overlay options follow
containerd 2.x's order (layer options first, configured options last).
"""
from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

import snapshotter.overlay as overlay_module
from pysnap.config import SnapshotterConfig
from pysnap.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unknown
from snapshotter.kernel import OverlayFeatures
from snapshotter.model import Info, Kind, Usage
from snapshotter.mounts import Mount, snapshot_mounts
from snapshotter.overlay import UPPERDIR_LABEL, OverlaySnapshotter

from snapshot_helpers import EPOCH_NS, HOST_FEATURES, TickingClock

UIDMAP = "containerd.io/snapshot/uidmapping"
GIDMAP = "containerd.io/snapshot/gidmapping"


# --------------------------------------------------------------------------- helpers


def sid(sn: OverlaySnapshotter, key: str) -> int:
    """The numeric ID (= directory name) of snapshot ``key``."""
    with sn.store.read() as tx:
        return tx.get(key).id


def up(sn: OverlaySnapshotter, key: str) -> Path:
    return sn.upper_dir(sid(sn, key))


def wk(sn: OverlaySnapshotter, key: str) -> Path:
    return sn.work_dir(sid(sn, key))


def committed(sn: OverlaySnapshotter, name: str, parent: str = "", labels: dict[str, str] | None = None) -> str:
    """Prepare ``<name>-active`` on ``parent`` and commit it as ``name``."""
    sn.prepare(f"{name}-active", parent)
    sn.commit(name, f"{name}-active", labels)
    return name


def chain(sn: OverlaySnapshotter, *names: str) -> None:
    """Committed snapshots stacked in the given order (first = base layer)."""
    parent = ""
    for name in names:
        committed(sn, name, parent)
        parent = name


def entries(sn: OverlaySnapshotter) -> set[str]:
    return set(os.listdir(sn.snapshots_dir))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def blocks(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


@contextmanager
def tmpfs_mounted(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


WALK_CORPUS = [
    # name, kind, parent, labels -- the snapshots of containerd's testsuite Walk test
    ("p", Kind.COMMITTED, "", {}),
    ("p-wl", Kind.COMMITTED, "", {"l": "1"}),
    ("a-np", Kind.ACTIVE, "", {}),
    ("a", Kind.ACTIVE, "p", {}),
    ("v", Kind.VIEW, "p", {}),
    ("a-wl", Kind.ACTIVE, "p-wl", {"l": "2"}),
    ("v-wl", Kind.VIEW, "p-wl", {"l": "3"}),
    ("a-np-wl", Kind.ACTIVE, "", {"l": "2"}),
]
GC_ROOT = {"containerd.io/gc.root": "check-walk"}


@pytest.fixture
def walk_corpus(sn: OverlaySnapshotter) -> OverlaySnapshotter:
    for name, kind, parent, labels in WALK_CORPUS:
        labels = {**labels, **GC_ROOT}
        if kind is Kind.COMMITTED:
            sn.prepare(f"{name}-tmp", parent)
            sn.commit(name, f"{name}-tmp", labels)
        elif kind is Kind.ACTIVE:
            sn.prepare(name, parent, labels)
        else:
            sn.view(name, parent, labels)
    return sn


# =========================================================================== Prepare / View


def test_prepare_without_parent_returns_a_rw_bind_of_its_own_fs(sn):
    mounts = sn.prepare("a")
    assert mounts == [Mount("bind", str(sn.root / "snapshots" / "1" / "fs"), ("rw", "rbind"))]


def test_prepare_with_one_parent_returns_an_overlay_with_workdir_upperdir_lowerdir_then_options(sn):
    committed(sn, "base")
    mounts = sn.prepare("a", "base")
    assert mounts == [
        Mount(
            "overlay",
            "overlay",
            (f"workdir={wk(sn, 'a')}", f"upperdir={up(sn, 'a')}", f"lowerdir={up(sn, 'base')}", "index=off"),
        )
    ]


def test_lowerdir_lists_the_parents_nearest_first(sn):
    chain(sn, "base", "mid", "top")
    [mount] = sn.prepare("a", "top")
    assert f"lowerdir={up(sn, 'top')}:{up(sn, 'mid')}:{up(sn, 'base')}" in mount.options


def test_every_option_is_a_separate_string_and_no_target_is_set(sn):
    chain(sn, "base", "top")
    for mount in sn.prepare("a", "top") + sn.view("v", "top") + sn.prepare("b") + sn.view("w", "base"):
        assert mount.target == ""
        assert all("," not in option for option in mount.options)


def test_all_paths_in_mounts_are_absolute(sn):
    chain(sn, "base", "top")
    [mount] = sn.prepare("a", "top")
    for option in mount.options:
        if "=" in option and option.split("=")[0] in ("workdir", "upperdir", "lowerdir"):
            for path in option.split("=", 1)[1].split(":"):
                assert os.path.isabs(path)


def test_view_without_parent_is_a_readonly_bind_of_its_own_empty_fs(sn):
    mounts = sn.view("v")
    assert mounts == [Mount("bind", str(up(sn, "v")), ("ro", "rbind"))]
    assert os.listdir(up(sn, "v")) == []


def test_view_of_a_single_parent_is_a_readonly_bind_of_the_parent(sn):
    committed(sn, "base")
    mounts = sn.view("v", "base")
    assert mounts == [Mount("bind", str(up(sn, "base")), ("ro", "rbind"))]


def test_view_of_two_or_more_parents_is_a_lowerdir_only_overlay(sn):
    chain(sn, "base", "mid", "top")
    mounts = sn.view("v", "top")
    assert mounts == [
        Mount("overlay", "overlay", (f"lowerdir={up(sn, 'top')}:{up(sn, 'mid')}:{up(sn, 'base')}", "index=off"))
    ]


def test_prepare_creates_fs_and_work_but_view_creates_only_fs(sn):
    sn.prepare("a")
    sn.view("v")
    assert sorted(os.listdir(up(sn, "a").parent)) == ["fs", "work"]
    assert sorted(os.listdir(up(sn, "v").parent)) == ["fs"]


def test_snapshot_ids_count_up_from_one(sn):
    sn.prepare("a")
    sn.view("v")
    sn.prepare("b")
    assert [sid(sn, k) for k in ("a", "v", "b")] == [1, 2, 3]
    assert entries(sn) == {"1", "2", "3"}


def test_prepare_records_an_active_snapshot_with_its_labels_and_times(sn, clock):
    committed(sn, "base")
    clock.tick()
    sn.prepare("a", "base", {"x": "1"})
    assert sn.stat("a") == Info("a", "base", Kind.ACTIVE, clock.now, clock.now, {"x": "1"})


def test_view_records_a_view_snapshot(sn, clock):
    sn.view("v", labels={"x": "1"})
    assert sn.stat("v") == Info("v", "", Kind.VIEW, clock.now, clock.now, {"x": "1"})


def test_empty_label_values_are_not_stored(sn):
    sn.prepare("a", labels={"keep": "1", "drop": ""})
    assert sn.stat("a").labels == {"keep": "1"}


def test_prepare_with_an_unknown_parent_is_not_found(sn):
    with pytest.raises(NotFound) as exc:
        sn.prepare("a", "nope")
    assert str(exc.value) == 'failed to create snapshot: missing parent "nope" bucket: not found'


@pytest.mark.parametrize("parent_kind", ["active", "view"])
def test_prepare_on_a_parent_that_is_not_committed_is_invalid_argument(sn, parent_kind):
    (sn.prepare if parent_kind == "active" else sn.view)("p")
    with pytest.raises(InvalidArgument) as exc:
        sn.prepare("a", "p")
    assert str(exc.value) == 'parent "p" is not committed snapshot: invalid argument'


def test_view_on_a_parent_that_is_not_committed_is_invalid_argument(sn):
    sn.prepare("p")
    with pytest.raises(InvalidArgument, match="is not committed snapshot"):
        sn.view("v", "p")


@pytest.mark.parametrize("existing", ["active", "view", "committed"])
@pytest.mark.parametrize("create", ["prepare", "view"])
def test_creating_a_key_that_exists_in_any_kind_is_already_exists(sn, existing, create):
    if existing == "active":
        sn.prepare("k")
    elif existing == "view":
        sn.view("k")
    else:
        committed(sn, "k")
    with pytest.raises(AlreadyExists) as exc:
        getattr(sn, create)("k")
    assert str(exc.value) == "snapshot k: already exists"


def test_an_unknown_parent_is_reported_before_an_existing_key(sn):
    sn.prepare("k")
    with pytest.raises(NotFound):
        sn.prepare("k", "nope")


def test_a_parent_that_is_not_committed_is_reported_before_an_existing_key(sn):
    sn.prepare("k")
    with pytest.raises(InvalidArgument):
        sn.prepare("k", "k")


def test_a_failed_prepare_leaves_no_directory_and_no_record(sn):
    sn.prepare("a")
    before = entries(sn)
    with pytest.raises(AlreadyExists):
        sn.prepare("a")
    with pytest.raises(Unknown):
        sn.prepare("b", labels={UIDMAP: "garbage"})
    assert entries(sn) == before
    with pytest.raises(NotFound):
        sn.stat("b")


def test_a_failed_prepare_does_not_use_up_an_id(sn):
    sn.prepare("a")
    with pytest.raises(Unknown):
        sn.prepare("b", labels={UIDMAP: "garbage"})
    sn.prepare("c")
    assert sid(sn, "c") == 2


@pytest.mark.parametrize("key", ["", "..", "../x", "x/..", "a/../b", "a\x00b", "k" * 4097])
@pytest.mark.parametrize("create", ["prepare", "view"])
def test_malformed_keys_are_invalid_argument(sn, key, create):
    with pytest.raises(InvalidArgument):
        getattr(sn, create)(key)
    assert entries(sn) == set()


def test_an_empty_key_is_invalid_argument_with_a_clear_message(sn):
    with pytest.raises(InvalidArgument) as exc:
        sn.prepare("")
    assert str(exc.value) == "key must not be empty: invalid argument"


@pytest.mark.parametrize(
    "key", ["default/7/extract-123456789-AbCd sha256:0123abcd", "a..b", "..a", "a/.b", "./a", "é/ü", "k" * 4096]
)
def test_keys_are_opaque_text_with_slashes_spaces_colons_and_dots(sn, key):
    sn.prepare(key)
    assert sn.stat(key).name == key


# =========================================================================== directories and ownership


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o777])
def test_directory_modes_do_not_depend_on_the_umask(make_snapshotter, tmp_path, mask):
    with umask(mask):
        sn = make_snapshotter()
        sn.prepare("a")
        sn.view("v")
    snap = sn.root / "snapshots"
    assert mode(sn.root) == 0o700
    assert mode(snap) == 0o700
    assert mode(snap / "1") == 0o700
    assert mode(snap / "1" / "fs") == 0o755
    assert mode(snap / "1" / "work") == 0o711
    assert mode(snap / "2") == 0o700
    assert mode(snap / "2" / "fs") == 0o755


def test_an_existing_root_is_tightened_to_0700(make_snapshotter, tmp_path):
    root = tmp_path / "root"
    (root / "snapshots").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "snapshots", 0o777)
    make_snapshotter(root)
    assert mode(root) == 0o700
    assert mode(root / "snapshots") == 0o700


def test_metadata_lives_in_metadata_db_under_the_root(sn):
    assert (sn.root / "metadata.db").is_file()


def test_a_new_fs_is_owned_by_root_when_there_is_no_parent(sn):
    sn.prepare("a")
    st = os.lstat(up(sn, "a"))
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


@pytest.mark.parametrize("create", ["prepare", "view"])
def test_a_new_fs_is_chowned_to_the_owner_of_the_parents_fs(sn, create):
    sn.prepare("base-active")
    os.lchown(up(sn, "base-active"), 1234, 5678)
    sn.commit("base", "base-active")
    committed(sn, "top", "base")
    getattr(sn, create)("child", "top")
    # the immediate parent (top) inherited 1234:5678 from base; the child inherits from top
    st = os.lstat(up(sn, "top"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    st = os.lstat(up(sn, "child"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_only_the_immediate_parents_owner_counts(sn):
    sn.prepare("base-active")
    os.lchown(up(sn, "base-active"), 1, 1)
    sn.commit("base", "base-active")
    sn.prepare("top-active", "base")
    os.lchown(up(sn, "top-active"), 2, 3)
    sn.commit("top", "top-active")
    sn.prepare("a", "top")
    st = os.lstat(up(sn, "a"))
    assert (st.st_uid, st.st_gid) == (2, 3)


def test_uid_and_gid_mapping_labels_chown_fs_to_the_host_ids_of_container_root(sn):
    sn.prepare("a", labels={UIDMAP: "0:100000:65536", GIDMAP: "0:200000:65536"})
    st = os.lstat(up(sn, "a"))
    assert (st.st_uid, st.st_gid) == (100000, 200000)


def test_a_mapping_label_with_several_ranges_uses_the_range_holding_container_id_0(sn):
    sn.prepare("a", labels={UIDMAP: "1:5000:100,0:666:1", GIDMAP: "0:6666:1,1:7000:10"})
    st = os.lstat(up(sn, "a"))
    assert (st.st_uid, st.st_gid) == (666, 6666)


def test_mapping_labels_win_over_the_parents_owner(sn):
    sn.prepare("base-active")
    os.lchown(up(sn, "base-active"), 1234, 5678)
    sn.commit("base", "base-active")
    sn.prepare("a", "base", {UIDMAP: "0:666:1000", GIDMAP: "0:777:1000"})
    st = os.lstat(up(sn, "a"))
    assert (st.st_uid, st.st_gid) == (666, 777)


def test_mapping_labels_are_stored_like_any_other_label(sn):
    labels = {UIDMAP: "0:666:1000,1000:6666:64536", GIDMAP: "0:666:1000,1000:6666:64536"}
    sn.prepare("a", labels=labels)
    assert sn.stat("a").labels == labels


@pytest.mark.parametrize("value", ["garbage", "0:1", "0:a:1", "1:100:10"])
def test_an_unusable_mapping_label_is_an_unknown_error(sn, value):
    with pytest.raises(Unknown, match=UIDMAP):
        sn.prepare("a", labels={UIDMAP: value})


# =========================================================================== overlay options


def overlay_options(sn: OverlaySnapshotter) -> tuple[str, ...]:
    if "base" not in {i.name for i in sn.list()}:
        committed(sn, "base")
    [mount] = sn.prepare("probe", "base")
    sn.remove("probe")
    return mount.options[3:]


def test_index_off_is_added_when_the_overlay_module_has_an_index_parameter(make_snapshotter):
    sn = make_snapshotter(features=HOST_FEATURES)
    assert overlay_options(sn) == ("index=off",)


def test_index_off_is_not_added_without_an_index_parameter(make_snapshotter):
    sn = make_snapshotter(features=dataclasses.replace(HOST_FEATURES, has_index_parameter=False))
    assert overlay_options(sn) == ()


def test_configured_mount_options_come_after_the_layer_options_in_order_then_index_off(make_snapshotter):
    sn = make_snapshotter(mount_options=("volatile", "redirect_dir=off"))
    committed(sn, "base")
    [mount] = sn.prepare("a", "base")
    assert mount.options == (
        f"workdir={wk(sn, 'a')}", f"upperdir={up(sn, 'a')}", f"lowerdir={up(sn, 'base')}",
        "volatile", "redirect_dir=off", "index=off",
    )


def test_configured_mount_options_follow_the_lowerdir_of_a_multi_parent_view(make_snapshotter):
    sn = make_snapshotter(mount_options=("volatile",))
    chain(sn, "base", "top")
    [mount] = sn.view("v", "top")
    assert mount.options == (f"lowerdir={up(sn, 'top')}:{up(sn, 'base')}", "volatile", "index=off")


def test_configured_mount_options_never_apply_to_bind_mounts(make_snapshotter):
    sn = make_snapshotter(mount_options=("volatile",))
    committed(sn, "base")
    assert sn.prepare("a")[0].options == ("rw", "rbind")
    assert sn.view("v0")[0].options == ("ro", "rbind")
    assert sn.view("v1", "base")[0].options == ("ro", "rbind")


def test_a_configured_bare_index_option_suppresses_index_off(make_snapshotter):
    sn = make_snapshotter(mount_options=("index",))
    assert overlay_options(sn) == ("index",)


def test_a_configured_index_on_does_not_suppress_index_off_as_in_containerd(make_snapshotter):
    # containerd's hasOption(options, "index", false) matches only the exact string "index".
    sn = make_snapshotter(mount_options=("index=on",))
    assert overlay_options(sn) == ("index=on", "index=off")


def test_userxattr_is_added_inside_a_user_namespace_on_kernel_5_11_or_later(make_snapshotter):
    sn = make_snapshotter(features=OverlayFeatures(True, True, (5, 11)))
    assert overlay_options(sn) == ("userxattr", "index=off")


def test_userxattr_is_not_added_inside_a_user_namespace_before_kernel_5_11(make_snapshotter):
    sn = make_snapshotter(features=OverlayFeatures(True, True, (5, 10)))
    assert overlay_options(sn) == ("index=off",)


def test_userxattr_is_never_added_on_the_host(make_snapshotter):
    sn = make_snapshotter(features=OverlayFeatures(True, False, (6, 8)))
    assert "userxattr" not in overlay_options(sn)


def test_a_configured_userxattr_is_not_repeated(make_snapshotter):
    sn = make_snapshotter(features=OverlayFeatures(True, True, (6, 1)), mount_options=("userxattr",))
    assert overlay_options(sn) == ("userxattr", "index=off")


def test_userxattr_is_not_added_when_the_root_is_on_tmpfs(make_snapshotter, tmp_path):
    with tmpfs_mounted(tmp_path / "tmpfs") as mnt:
        sn = make_snapshotter(mnt / "root", features=OverlayFeatures(True, True, (6, 1)))
        try:
            assert overlay_options(sn) == ("index=off",)
        finally:
            sn.close()


# =========================================================================== Mounts


def test_mounts_of_every_active_and_view_equals_the_create_result(sn):
    chain(sn, "base", "top")
    created = {
        "a0": sn.prepare("a0"),
        "a1": sn.prepare("a1", "base"),
        "a2": sn.prepare("a2", "top"),
        "v0": sn.view("v0"),
        "v1": sn.view("v1", "base"),
        "v2": sn.view("v2", "top"),
    }
    for key, mounts in created.items():
        assert sn.mounts(key) == mounts, key


def test_mounts_of_an_unknown_key_is_not_found(sn):
    with pytest.raises(NotFound) as exc:
        sn.mounts("nope")
    assert str(exc.value) == "failed to get active mount: snapshot nope does not exist: not found"


def test_a_committed_snapshot_is_not_mountable(sn):
    committed(sn, "c")
    with pytest.raises(FailedPrecondition) as exc:
        sn.mounts("c")
    assert str(exc.value) == "requested snapshot c not active or view: failed precondition"


# =========================================================================== Commit


def test_commit_turns_an_active_snapshot_into_a_committed_one_with_the_same_parent(sn):
    committed(sn, "base")
    sn.prepare("a", "base")
    sn.commit("c", "a")
    info = sn.stat("c")
    assert (info.name, info.parent, info.kind) == ("c", "base", Kind.COMMITTED)


def test_commit_keeps_the_id_and_the_directory(sn):
    sn.prepare("a")
    (up(sn, "a") / "file").write_text("hello")
    before = sid(sn, "a")
    sn.commit("c", "a")
    assert sid(sn, "c") == before
    assert (sn.upper_dir(before) / "file").read_text() == "hello"
    assert sn.work_dir(before).is_dir()  # work/ is left alone, as in containerd
    assert entries(sn) == {str(before)}


def test_commit_makes_the_key_disappear_and_reusable(sn):
    sn.prepare("a")
    sn.commit("c", "a")
    with pytest.raises(NotFound):
        sn.stat("a")
    sn.prepare("a", "c")
    assert sn.stat("a").parent == "c"
    assert sid(sn, "a") != sid(sn, "c")


def test_commit_labels_replace_the_labels_of_the_active_snapshot(sn):
    sn.prepare("a", labels={"from-active": "1", "shared": "active"})
    sn.commit("c", "a", {"shared": "commit", "new": "2"})
    assert sn.stat("c").labels == {"shared": "commit", "new": "2"}


def test_commit_without_labels_leaves_none(sn):
    sn.prepare("a", labels={"from-active": "1"})
    sn.commit("c", "a")
    assert sn.stat("c").labels == {}


def test_commit_sets_created_and_updated_to_the_commit_time(sn, clock):
    sn.prepare("a")
    now = clock.tick()
    sn.commit("c", "a")
    info = sn.stat("c")
    assert info.created_ns == info.updated_ns == now


def test_children_of_a_committed_snapshot_see_its_fs_as_lowerdir(sn):
    sn.prepare("a")
    fs = up(sn, "a")
    sn.commit("c", "a")
    [mount] = sn.prepare("child", "c")
    assert f"lowerdir={fs}" in mount.options


def test_commit_of_an_unknown_key_is_not_found(sn):
    with pytest.raises(NotFound) as exc:
        sn.commit("c", "nope")
    assert str(exc.value) == "failed to commit snapshot nope: snapshot does not exist: not found"


def test_an_unknown_key_is_reported_before_an_existing_name(sn):
    committed(sn, "c")
    with pytest.raises(NotFound):
        sn.commit("c", "nope")


@pytest.mark.parametrize("existing", ["active", "view", "committed"])
def test_commit_onto_an_existing_name_of_any_kind_is_already_exists(sn, existing):
    if existing == "active":
        sn.prepare("n")
    elif existing == "view":
        sn.view("n")
    else:
        committed(sn, "n")
    sn.prepare("a")
    with pytest.raises(AlreadyExists) as exc:
        sn.commit("n", "a")
    assert str(exc.value) == "committed snapshot n: already exists"
    assert sn.stat("a").kind is Kind.ACTIVE


def test_commit_under_its_own_key_is_already_exists(sn):
    sn.prepare("a")
    with pytest.raises(AlreadyExists, match="committed snapshot a: already exists"):
        sn.commit("a", "a")


@pytest.mark.parametrize("kind", ["view", "committed"])
def test_commit_of_a_snapshot_that_is_not_active_is_failed_precondition(sn, kind):
    if kind == "view":
        sn.view("k")
    else:
        committed(sn, "k")
    with pytest.raises(FailedPrecondition) as exc:
        sn.commit("c", "k")
    assert str(exc.value) == 'snapshot "k" is not active: failed precondition'


def test_an_existing_name_is_reported_before_a_key_that_is_not_active(sn):
    sn.view("v")
    committed(sn, "n")
    with pytest.raises(AlreadyExists):
        sn.commit("n", "v")


@pytest.mark.parametrize("name", ["", "..", "a/../b"])
def test_commit_to_a_malformed_name_is_invalid_argument(sn, name):
    sn.prepare("a")
    with pytest.raises(InvalidArgument):
        sn.commit(name, "a")
    assert sn.stat("a").kind is Kind.ACTIVE


# =========================================================================== Remove


def test_remove_deletes_the_record(sn):
    sn.prepare("a")
    sn.remove("a")
    with pytest.raises(NotFound):
        sn.stat("a")
    assert sn.list() == []


@pytest.mark.parametrize("kind", ["active", "view", "committed"])
def test_a_removed_key_can_be_created_again(sn, kind):
    if kind == "active":
        sn.prepare("k")
    elif kind == "view":
        sn.view("k")
    else:
        committed(sn, "k")
    first = sid(sn, "k")
    sn.remove("k")
    sn.view("k")
    sn.remove("k")
    sn.prepare("k")
    assert sid(sn, "k") > first


def test_a_just_removed_committed_name_can_be_committed_into_again(sn):
    committed(sn, "c")
    sn.remove("c")
    sn.prepare("a")
    sn.commit("c", "a")
    assert sn.stat("c").kind is Kind.COMMITTED


def test_remove_of_an_unknown_key_is_not_found(sn):
    with pytest.raises(NotFound) as exc:
        sn.remove("nope")
    assert str(exc.value) == "failed to remove snapshot nope: snapshot nope: not found"


@pytest.mark.parametrize("child", ["active", "view", "committed"])
def test_remove_of_a_snapshot_with_a_child_is_failed_precondition(sn, child):
    committed(sn, "base")
    if child == "active":
        sn.prepare("child", "base")
    elif child == "view":
        sn.view("child", "base")
    else:
        committed(sn, "child", "base")
    with pytest.raises(FailedPrecondition) as exc:
        sn.remove("base")
    assert str(exc.value) == "failed to remove snapshot base: cannot remove snapshot with child: failed precondition"
    assert sn.stat("base").kind is Kind.COMMITTED


def test_snapshots_can_be_removed_top_down(sn):
    chain(sn, "base", "mid", "top")
    sn.view("v", "top")
    with pytest.raises(FailedPrecondition, match="remove"):
        sn.remove("mid")
    for key in ("v", "top", "mid", "base"):
        sn.remove(key)
    assert sn.list() == []


def test_remove_does_not_delete_the_directory_itself(sn):
    sn.reaper.stop()  # no background pass: what is left is what Remove did
    sn.prepare("a")
    path = up(sn, "a").parent
    sn.remove("a")
    assert path.is_dir()


def test_remove_wakes_the_reaper_which_deletes_the_directory(sn):
    sn.prepare("a")
    path = up(sn, "a").parent
    sn.remove("a")
    assert sn.reaper.wait_idle(10)
    assert not path.exists()


# =========================================================================== Stat


def test_stat_returns_name_parent_kind_times_and_labels(sn, clock):
    committed(sn, "base")
    created = clock.tick()
    sn.view("v", "base", {"a": "1"})
    assert sn.stat("v") == Info("v", "base", Kind.VIEW, created, created, {"a": "1"})


def test_stat_of_a_root_snapshot_has_an_empty_parent(sn):
    sn.prepare("a")
    assert sn.stat("a").parent == ""


def test_stat_of_a_child_names_its_parent_and_not_the_grandparent(sn):
    chain(sn, "a", "b")
    assert sn.stat("b").parent == "a"
    assert sn.stat("a").parent == ""


def test_stat_of_an_unknown_key_is_not_found(sn):
    with pytest.raises(NotFound) as exc:
        sn.stat("nope")
    assert str(exc.value) == "snapshot nope does not exist: not found"


def test_timestamps_keep_nanoseconds(sn, clock):
    sn.prepare("a")
    assert sn.stat("a").created_ns == EPOCH_NS


def test_timestamps_default_to_the_wall_clock_in_nanoseconds(make_snapshotter):
    sn = make_snapshotter()
    before = time.time_ns()
    sn.prepare("a")
    after = time.time_ns()
    info = sn.stat("a")
    assert before <= info.created_ns == info.updated_ns <= after


# =========================================================================== Update


@pytest.fixture
def labelled(sn, clock) -> OverlaySnapshotter:
    sn.prepare("a", labels={"keep": "1", "change": "old", "drop": "x"})
    clock.tick()
    return sn


def test_update_without_a_mask_replaces_all_labels(labelled):
    info = labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {"change": "new", "add": "y"}))
    assert info.labels == {"change": "new", "add": "y"}
    assert labelled.stat("a").labels == {"change": "new", "add": "y"}


def test_update_with_the_labels_mask_replaces_all_labels(labelled):
    info = labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {"only": "1"}), ["labels"])
    assert info.labels == {"only": "1"}


def test_update_with_an_empty_label_set_removes_every_label(labelled):
    assert labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {}), ["labels"]).labels == {}


def test_update_with_labels_dot_key_changes_only_that_label(labelled):
    info = labelled.update(
        Info("a", "", Kind.ACTIVE, 0, 0, {"change": "new", "add": "y", "ignored": "z"}),
        ["labels.change", "labels.add"],
    )
    assert info.labels == {"keep": "1", "change": "new", "drop": "x", "add": "y"}


def test_update_with_labels_dot_key_absent_from_the_request_deletes_it(labelled):
    info = labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {}), ["labels.drop"])
    assert info.labels == {"keep": "1", "change": "old"}


def test_update_with_labels_dot_key_set_to_empty_deletes_it(labelled):
    info = labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {"drop": ""}), ["labels.drop"])
    assert "drop" not in info.labels


def test_update_without_a_mask_drops_empty_label_values(labelled):
    info = labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {"x": "", "y": "1"}))
    assert info.labels == {"y": "1"}


def test_update_mask_labels_dot_key_with_dots_names_the_whole_rest(sn):
    sn.prepare("a")
    info = sn.update(Info("a", "", Kind.ACTIVE, 0, 0, {"a.b": "1", "a": "2"}), ["labels.a.b"])
    assert info.labels == {"a.b": "1"}


@pytest.mark.parametrize("path", ["name", "parent", "kind", "created_at", "updated_at", "label", "labelsx"])
def test_update_with_any_other_mask_path_is_invalid_argument(labelled, path):
    with pytest.raises(InvalidArgument) as exc:
        labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {}), [path])
    assert str(exc.value) == f'cannot update "{path}" field on snapshot "a": invalid argument'


def test_an_unknown_snapshot_is_reported_before_an_invalid_mask_path(sn):
    # containerd's UpdateInfo looks the snapshot up first, then checks the paths
    with pytest.raises(NotFound):
        sn.update(Info("nope", "", Kind.ACTIVE, 0, 0, {}), ["parent"])


def test_an_invalid_mask_path_rejects_the_whole_update(labelled, clock):
    before = labelled.stat("a")
    with pytest.raises(InvalidArgument):
        labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {"keep": "2"}), ["labels.keep", "parent"])
    assert labelled.stat("a") == before


def test_update_sets_updated_to_now_and_keeps_created(labelled, clock):
    created = labelled.stat("a").created_ns
    info = labelled.update(Info("a", "", Kind.ACTIVE, 0, 0, {}))
    assert info.created_ns == created
    assert info.updated_ns == clock.now != created
    assert labelled.stat("a") == info


def test_update_ignores_name_parent_kind_and_times_in_the_request_info(sn, clock):
    committed(sn, "base")
    sn.prepare("a", "base")
    stored = sn.stat("a")
    info = sn.update(Info("a", "bogus", Kind.VIEW, 1, 2, {"x": "1"}))
    assert (info.name, info.parent, info.kind, info.created_ns) == ("a", "base", Kind.ACTIVE, stored.created_ns)


def test_update_works_on_every_kind(sn):
    committed(sn, "c")
    sn.prepare("a")
    sn.view("v")
    for key in ("c", "a", "v"):
        assert sn.update(Info(key, "", Kind.COMMITTED, 0, 0, {"k": key})).labels == {"k": key}


def test_update_of_an_unknown_snapshot_is_not_found(sn):
    with pytest.raises(NotFound) as exc:
        sn.update(Info("nope", "", Kind.ACTIVE, 0, 0, {"a": "1"}))
    assert str(exc.value) == "snapshot nope: not found"


# =========================================================================== labels


def test_a_label_of_exactly_4096_bytes_is_accepted(sn):
    sn.prepare("a", labels={"k": "v" * 4095})


@pytest.mark.parametrize(
    "labels", [{"k": "v" * 4096}, {"k" * 4097: ""}, {"k": "é" * 2048}], ids=["ascii", "long-key", "multibyte"]
)
def test_a_label_whose_key_and_value_exceed_4096_bytes_is_invalid_argument(sn, labels):
    with pytest.raises(InvalidArgument, match=r"label key and value greater than maximum size \(4096 bytes\)"):
        sn.prepare("a", labels=labels)
    with pytest.raises(InvalidArgument):
        sn.view("v", labels=labels)
    sn.prepare("b")
    with pytest.raises(InvalidArgument):
        sn.commit("c", "b", labels)
    with pytest.raises(InvalidArgument):
        sn.update(Info("b", "", Kind.ACTIVE, 0, 0, labels))
    assert [i.name for i in sn.list()] == ["b"]


def test_the_upperdir_label_is_added_to_stat_list_and_update_when_enabled(make_snapshotter):
    sn = make_snapshotter(upperdir_label=True)
    sn.prepare("a", labels={"x": "1"})
    expected = {"x": "1", UPPERDIR_LABEL: str(up(sn, "a"))}
    assert sn.stat("a").labels == expected
    assert sn.list()[0].labels == expected
    assert sn.update(Info("a", "", Kind.ACTIVE, 0, 0, {"x": "1"})).labels == expected


def test_the_upperdir_label_is_not_stored(make_snapshotter, tmp_path):
    sn = make_snapshotter(upperdir_label=True)
    sn.prepare("a")
    sn.update(Info("a", "", Kind.ACTIVE, 0, 0, {"x": "1"}))
    sn.close()
    assert make_snapshotter().stat("a").labels == {"x": "1"}


def test_the_upperdir_label_is_absent_by_default(sn):
    sn.prepare("a")
    assert sn.stat("a").labels == {}


def test_list_filters_do_not_see_the_upperdir_label(make_snapshotter):
    # containerd's Walk filters the stored info, then adds the label for the caller.
    sn = make_snapshotter(upperdir_label=True)
    sn.prepare("a")
    assert sn.list([f'labels."{UPPERDIR_LABEL}"']) == []
    assert [i.name for i in sn.list([f'labels."{UPPERDIR_LABEL}"!=x'])] == ["a"]


# =========================================================================== Usage


def test_usage_of_a_fresh_active_snapshot_counts_its_fs_directory(sn):
    sn.prepare("a")
    assert sn.usage("a") == Usage(size=blocks(up(sn, "a")), inodes=1)


def test_usage_of_an_active_snapshot_is_measured_live(sn):
    sn.prepare("a")
    fs = up(sn, "a")
    (fs / "dir").mkdir()
    (fs / "dir" / "file").write_bytes(os.urandom(64 * 1024))
    os.symlink("dir/file", fs / "link")
    expected = sum(blocks(p) for p in (fs, fs / "dir", fs / "dir" / "file", fs / "link"))
    assert sn.usage("a") == Usage(size=expected, inodes=4)


def test_usage_counts_allocated_blocks_not_apparent_size(sn):
    sn.prepare("a")
    fs = up(sn, "a")
    with open(fs / "sparse", "wb") as f:
        f.truncate(10 * 1024 * 1024)
    assert sn.usage("a").size == blocks(fs) + blocks(fs / "sparse")
    assert sn.usage("a").size < 10 * 1024 * 1024


def test_usage_counts_a_hardlinked_file_once(sn):
    sn.prepare("a")
    fs = up(sn, "a")
    (fs / "file").write_bytes(os.urandom(32 * 1024))
    once = sn.usage("a")
    os.link(fs / "file", fs / "hardlink")
    assert sn.usage("a") == once
    assert once.inodes == 2


def test_usage_of_a_view_is_zero(sn):
    sn.prepare("base-active")
    (up(sn, "base-active") / "file").write_bytes(os.urandom(16 * 1024))
    sn.commit("base", "base-active")
    sn.view("v", "base")
    sn.view("v0")
    assert sn.usage("v") == Usage(0, 0)
    assert sn.usage("v0") == Usage(0, 0)


def test_usage_of_a_committed_snapshot_is_the_value_stored_at_commit(sn):
    sn.prepare("a")
    fs = up(sn, "a")
    (fs / "file").write_bytes(os.urandom(16 * 1024))
    at_commit = sn.usage("a")
    sn.commit("c", "a")
    (fs / "later").write_bytes(os.urandom(16 * 1024))  # not counted: the value was stored
    assert sn.usage("c") == at_commit


def test_usage_of_an_unknown_key_is_not_found(sn):
    with pytest.raises(NotFound) as exc:
        sn.usage("nope")
    assert str(exc.value) == "snapshot nope does not exist: not found"


# =========================================================================== List


def test_list_of_a_fresh_store_is_empty(sn):
    assert sn.list() == []


def test_cleanup_of_a_fresh_store_succeeds(sn):
    sn.cleanup()
    assert sn.reaper.wait_idle(10)


@pytest.mark.parametrize("call", ["stat", "mounts", "remove", "usage"])
def test_every_lookup_on_a_fresh_store_is_not_found(sn, call):
    with pytest.raises(NotFound):
        getattr(sn, call)("k")


def test_commit_and_update_on_a_fresh_store_are_not_found(sn):
    with pytest.raises(NotFound):
        sn.commit("c", "k")
    with pytest.raises(NotFound):
        sn.update(Info("k", "", Kind.ACTIVE, 0, 0, {}))


def test_list_returns_every_snapshot_sorted_bytewise_by_name(sn):
    keys = ["b", "a", "B", "a b", "a/b", "a-b", "é", "z", "Z", "_", "a\u00ff", "a\u0100", "\U0001f600", "10", "9"]
    for key in keys:
        sn.prepare(key)
    assert [i.name for i in sn.list()] == sorted(keys, key=lambda k: k.encode())


def test_list_returns_the_same_infos_as_stat(walk_corpus):
    sn = walk_corpus
    infos = sn.list()
    assert infos == [sn.stat(i.name) for i in infos]


def test_list_without_filters_returns_everything(walk_corpus):
    assert {i.name for i in walk_corpus.list()} == {n for n, *_ in WALK_CORPUS}


@pytest.mark.parametrize(
    "filters, expected",
    [
        (['labels."containerd.io/gc.root"==check-walk'], {n for n, *_ in WALK_CORPUS}),
        (["kind==active,labels.\"containerd.io/gc.root\"==check-walk"], {"a-np", "a", "a-wl", "a-np-wl"}),
        (["name==p", "name==a-np-wl"], {"p", "a-np-wl"}),
        (["name==a-wl,labels.l"], {"a-wl"}),
        (["parent==p"], {"a", "v"}),
        (['parent!="",labels.l'], {"a-wl", "v-wl"}),
        (["labels.l"], {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
        (["labels.l==2"], {"a-wl", "a-np-wl"}),
        (['parent==""'], {"p", "p-wl", "a-np", "a-np-wl"}),
        (["kind==view"], {"v", "v-wl"}),
        (["kind==committed"], {"p", "p-wl"}),
        (["name~=^a-"], {"a-np", "a-wl", "a-np-wl"}),
        ([""], {n for n, *_ in WALK_CORPUS}),
        (["nosuchfield"], set()),
    ],
)
def test_list_filters_select_as_containerd_does(walk_corpus, filters, expected):
    assert {i.name for i in walk_corpus.list(filters)} == expected


def test_list_with_a_filter_that_does_not_parse_is_invalid_argument(walk_corpus):
    with pytest.raises(InvalidArgument) as exc:
        walk_corpus.list(["name==a", "name=="])
    assert "parse error" in str(exc.value)
    assert str(exc.value).endswith(": invalid argument")


# =========================================================================== the directory reaper


def test_cleanup_deletes_directories_of_removed_snapshots(sn):
    sn.prepare("a")
    sn.prepare("b")
    sn.reaper.stop()
    sn.remove("a")
    assert entries(sn) == {"1", "2"}
    assert sn.reaper.reap_once() == ["1"]
    assert entries(sn) == {"2"}


def test_cleanup_deletes_staging_leftovers_stale_directories_and_stray_files(sn):
    sn.prepare("a")
    (sn.snapshots_dir / "new-abc123" / "fs").mkdir(parents=True)
    (sn.snapshots_dir / "stale-7-1234").mkdir()
    (sn.snapshots_dir / "stale-7-1234" / "file").write_text("x")
    (sn.snapshots_dir / "99").mkdir()
    (sn.snapshots_dir / "stray-file").write_text("x")
    os.symlink("/", sn.snapshots_dir / "stray-link")
    sn.cleanup()
    assert sn.reaper.wait_idle(10)
    assert entries(sn) == {"1"}
    assert Path("/").is_dir()  # the symlink was removed, not followed


def test_the_reaper_never_deletes_a_live_snapshot(sn):
    committed(sn, "c")
    sn.prepare("a", "c")
    sn.view("v", "c")
    for key in ("c", "a"):
        (up(sn, key) / "file").write_text(key)
    sn.prepare("doomed")
    sn.remove("doomed")
    sn.cleanup()
    assert sn.reaper.wait_idle(10)
    assert entries(sn) == {str(sid(sn, k)) for k in ("c", "a", "v")}
    assert (up(sn, "c") / "file").read_text() == "c"
    assert (up(sn, "a") / "file").read_text() == "a"


def test_the_reaper_keeps_an_orphan_with_a_mount_below_it_until_it_is_unmounted(sn):
    sn.prepare("a")
    path = up(sn, "a").parent
    with tmpfs_mounted(up(sn, "a")) as mnt:
        (mnt / "precious").write_text("keep me")
        sn.remove("a")
        assert sn.reaper.wait_idle(10)
        assert sn.reaper.reap_once() == []
        assert (mnt / "precious").read_text() == "keep me"
    assert sn.reaper.reap_once() == [path.name]
    assert not path.exists()


def test_the_reaper_keeps_an_orphan_that_is_itself_a_mount_point(sn):
    with tmpfs_mounted(sn.snapshots_dir / "stray") as mnt:
        (mnt / "precious").write_text("keep me")
        assert sn.reaper.reap_once() == []
        assert (mnt / "precious").read_text() == "keep me"
    assert sn.reaper.reap_once() == ["stray"]


def test_the_reaper_keeps_an_orphan_an_overlay_still_uses_as_a_layer(sn, tmp_path):
    committed(sn, "base")
    lower = up(sn, "base")
    (lower / "file").write_text("still read through an overlay")
    other, target = tmp_path / "other", tmp_path / "merged"
    other.mkdir()
    target.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}:{other}", str(target)], check=True)
    try:
        sn.remove("base")
        assert sn.reaper.wait_idle(10)
        assert lower.is_dir()
        assert (target / "file").read_text() == "still read through an overlay"
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert sn.reaper.reap_once() == [lower.parent.name]


def test_the_reaper_does_not_confuse_a_sibling_with_a_common_prefix_for_a_mount(sn):
    (sn.snapshots_dir / "1").mkdir()
    with tmpfs_mounted(sn.snapshots_dir / "12"):
        assert sn.reaper.reap_once() == ["1"]


def test_a_directory_claimed_by_a_prepare_while_the_reaper_runs_is_not_deleted(sn, monkeypatch):
    # A crash left snapshots/2 behind without a row; the next Prepare takes ID 2.  If that
    # Prepare runs while the reaper is deleting orphans (outside the lock), the reaper must
    # not delete the live snapshot's directory.
    sn.prepare("a")
    (sn.snapshots_dir / "2" / "fs").mkdir(parents=True)
    real = overlay_module.shutil.rmtree
    calls = []

    def prepare_in_between(path, *args, **kwargs):
        if not calls:
            calls.append(sn.prepare("late"))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(overlay_module.shutil, "rmtree", prepare_in_between)
    sn.reaper.reap_once()
    monkeypatch.undo()
    assert calls, "the reaper deleted nothing"
    assert sid(sn, "late") == 2
    assert up(sn, "late").is_dir()
    assert wk(sn, "late").is_dir()


def test_the_reaper_keeps_running_after_a_failed_pass(sn, monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(overlay_module, "mount_entries", broken)
    sn.cleanup()
    assert sn.reaper.wait_idle(10)
    monkeypatch.undo()
    sn.prepare("a")
    sn.remove("a")
    assert sn.reaper.wait_idle(10)
    assert entries(sn) == set()


def test_close_stops_the_reaper_thread(sn):
    thread = sn.reaper._thread
    sn.close()
    assert not thread.is_alive()


# =========================================================================== restart


def test_reopening_the_root_keeps_every_snapshot(make_snapshotter, tmp_path):
    sn = make_snapshotter(durable_metadata=True, clock=TickingClock())
    sn.prepare("base-active", labels={"x": "1"})
    (up(sn, "base-active") / "file").write_bytes(os.urandom(8192))
    sn.commit("base", "base-active", {"ref": "sha256:abc"})
    sn.prepare("a", "base", {"y": "2"})
    sn.view("v", "base")
    infos, mounts = sn.list(), {k: sn.mounts(k) for k in ("a", "v")}
    usage = sn.usage("base")
    sn.close()

    again = make_snapshotter(tmp_path / "root")
    assert again.list() == infos
    assert {k: again.mounts(k) for k in ("a", "v")} == mounts
    assert again.usage("base") == usage
    assert (up(again, "base") / "file").stat().st_size == 8192


def test_ids_are_never_reused_even_after_removing_the_newest_and_restarting(make_snapshotter, tmp_path):
    sn = make_snapshotter()
    sn.prepare("a")
    sn.prepare("b")
    sn.remove("b")
    sn.close()
    again = make_snapshotter(tmp_path / "root")
    again.prepare("c")
    assert sid(again, "c") == 3


def test_a_crash_leftover_directory_at_the_next_id_is_moved_aside(make_snapshotter, tmp_path):
    sn = make_snapshotter()
    sn.prepare("a")
    sn.close()
    leftover = tmp_path / "root" / "snapshots" / "2"
    (leftover / "fs").mkdir(parents=True)
    (leftover / "fs" / "junk").write_text("from before the crash")

    again = make_snapshotter(tmp_path / "root")
    again.prepare("b")
    assert sid(again, "b") == 2
    assert os.listdir(up(again, "b")) == []
    assert wk(again, "b").is_dir()
    stale = [e for e in entries(again) if e.startswith("stale-2-")]
    assert len(stale) == 1
    assert (again.snapshots_dir / stale[0] / "fs" / "junk").read_text() == "from before the crash"

    again.cleanup()
    assert again.reaper.wait_idle(10)
    assert entries(again) == {"1", "2"}


def test_a_root_with_a_newer_schema_is_refused(make_snapshotter, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    db = sqlite3.connect(root / "metadata.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        OverlaySnapshotter(SnapshotterConfig(root=root), HOST_FEATURES)


# =========================================================================== concurrency


def test_concurrent_prepares_and_commits_get_unique_ids_and_consistent_metadata(make_snapshotter):
    sn = make_snapshotter(clock=TickingClock())
    committed(sn, "base")
    n = 120

    def work(i: int) -> None:
        parent = "base" if i % 2 else ""
        sn.prepare(f"active-{i}", parent, {"i": str(i)})
        (up(sn, f"active-{i}") / "file").write_text(str(i))
        if i % 3:
            sn.commit(f"layer-{i}", f"active-{i}", {"i": str(i)})
        if i % 5 == 0:
            sn.view(f"view-{i}", "base")

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(work, range(n)))

    infos = sn.list()
    names = {i.name for i in infos}
    ids = {i.name: sid(sn, i.name) for i in infos}
    assert len(set(ids.values())) == len(ids)
    assert entries(sn) == {str(v) for v in ids.values()}
    for i in range(n):
        name = f"layer-{i}" if i % 3 else f"active-{i}"
        assert name in names
        info = sn.stat(name)
        assert info.parent == ("base" if i % 2 else "")
        assert info.labels == {"i": str(i)}
        assert (sn.upper_dir(ids[name]) / "file").read_text() == str(i)
        assert (f"active-{i}" in names) == (i % 3 == 0)
        assert (f"view-{i}" in names) == (i % 5 == 0)
    assert len(infos) == 1 + n + len(range(0, n, 5))


def test_concurrent_creates_of_one_key_let_exactly_one_win(make_snapshotter):
    sn = make_snapshotter()
    barrier = threading.Barrier(12)
    outcomes: list[str] = []

    def race(_: int) -> None:
        barrier.wait()
        try:
            sn.prepare("same")
            outcomes.append("ok")
        except AlreadyExists:
            outcomes.append("exists")

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(race, range(12)))
    assert sorted(outcomes) == ["exists"] * 11 + ["ok"]
    assert entries(sn) == {str(sid(sn, "same"))}


def test_removes_and_cleanups_running_alongside_prepares_never_lose_a_live_directory(make_snapshotter):
    sn = make_snapshotter()

    def work(i: int) -> None:
        sn.prepare(f"keep-{i}")
        sn.prepare(f"drop-{i}")
        sn.remove(f"drop-{i}")
        sn.cleanup()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(60)))
    assert sn.reaper.wait_idle(10)
    assert entries(sn) == {str(sid(sn, f"keep-{i}")) for i in range(60)}
    for i in range(60):
        assert up(sn, f"keep-{i}").is_dir()
