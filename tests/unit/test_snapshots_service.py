"""Specification of the snapshots gRPC layer, served in-process on a unix socket.

The server is assembled from the same pieces ``pysnap serve snapshotter`` uses
(``SnapshotsServicer`` over an ``OverlaySnapshotter``, ``pysnap.server.ErrorMapping``,
the 16 MiB message limits) and called with grpc.aio like containerd's proxy would.
"""
from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2
from grpc import aio

from pysnap import errors
from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from pysnap.server import MAX_MESSAGE_BYTES, ErrorMapping, status_of
from snapshot_helpers import EPOCH_NS, FakeClock
from snapshotter.model import Kind
from snapshotter.overlay import OverlaySnapshotter
from snapshotter.service import LIST_BATCH, SnapshotsServicer, info_from_pb

NAMESPACE = (("containerd-namespace", "default"),)


@dataclass
class Served:
    core: OverlaySnapshotter
    stub: pb_grpc.SnapshotsStub
    clock: FakeClock
    address: Path


@pytest.fixture
async def served(make_snapshotter, clock, short_tmp) -> AsyncIterator[Served]:
    core = make_snapshotter(clock=clock)
    executor = ThreadPoolExecutor(max_workers=4)
    server = aio.server(
        interceptors=[ErrorMapping()],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(core, executor), server)
    address = short_tmp / "snapshots.sock"
    server.add_insecure_port(f"unix://{address}")
    await server.start()
    channel = aio.insecure_channel(f"unix://{address}")
    try:
        yield Served(core, pb_grpc.SnapshotsStub(channel), clock, address)
    finally:
        await channel.close()
        await server.stop(None)
        executor.shutdown(wait=True)


async def rpc_error(awaitable) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as exc:
        await awaitable
    return exc.value


async def list_messages(stub, *filters: str) -> list[pb.ListSnapshotsResponse]:
    return [m async for m in stub.List(pb.ListSnapshotsRequest(snapshotter="pysnap", filters=list(filters)))]


async def prepare(stub, key, parent="", labels=None):
    return await stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="pysnap", key=key, parent=parent, labels=labels))


async def commit(stub, name, key, labels=None):
    return await stub.Commit(pb.CommitSnapshotRequest(snapshotter="pysnap", name=name, key=key, labels=labels))


# =========================================================================== happy paths


async def test_prepare_returns_one_bind_mount_as_protobuf_with_separate_options_and_no_target(served):
    response = await prepare(served.stub, "a")
    [mount] = response.mounts
    assert mount.type == "bind"
    assert mount.source == str(served.core.upper_dir(1))
    assert mount.target == ""
    assert list(mount.options) == ["rw", "rbind"]


async def test_prepare_on_a_parent_returns_the_overlay_options_in_order(served):
    await prepare(served.stub, "base-a")
    await commit(served.stub, "base", "base-a")
    [mount] = (await prepare(served.stub, "a", "base")).mounts
    up, wk, lower = served.core.upper_dir(2), served.core.work_dir(2), served.core.upper_dir(1)
    assert (mount.type, mount.source) == ("overlay", "overlay")
    assert list(mount.options) == [f"workdir={wk}", f"upperdir={up}", f"lowerdir={lower}", "index=off"]


async def test_view_and_mounts_return_the_same_mounts(served):
    await prepare(served.stub, "base-a")
    await commit(served.stub, "base", "base-a")
    view = await served.stub.View(pb.ViewSnapshotRequest(key="v", parent="base"))
    mounts = await served.stub.Mounts(pb.MountsRequest(key="v"))
    assert list(view.mounts) == list(mounts.mounts)
    assert [(m.type, m.source, list(m.options)) for m in view.mounts] == [
        ("bind", str(served.core.upper_dir(1)), ["ro", "rbind"])
    ]


async def test_stat_returns_name_parent_kind_labels_and_timestamps(served):
    await prepare(served.stub, "base-a")
    await commit(served.stub, "base", "base-a", {"ref": "x"})
    await prepare(served.stub, "a", "base", {"l": "1"})
    info = (await served.stub.Stat(pb.StatSnapshotRequest(key="a"))).info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("a", "base", pb.ACTIVE, {"l": "1"})
    base = (await served.stub.Stat(pb.StatSnapshotRequest(key="base"))).info
    assert (base.kind, dict(base.labels)) == (pb.COMMITTED, {"ref": "x"})


async def test_timestamps_carry_nanoseconds(served):
    await prepare(served.stub, "a")
    info = (await served.stub.Stat(pb.StatSnapshotRequest(key="a"))).info
    assert info.created_at.seconds == EPOCH_NS // 10**9
    assert info.created_at.nanos == EPOCH_NS % 10**9 == 123_456_789
    assert info.updated_at == info.created_at
    assert info.created_at.ToNanoseconds() == EPOCH_NS


async def test_update_returns_the_stored_info_with_a_fresh_updated_at(served):
    await prepare(served.stub, "a", labels={"keep": "1", "drop": "2"})
    later = served.clock.tick()
    response = await served.stub.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="a", labels={"new": "3"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.new", "labels.drop"]),
        )
    )
    assert dict(response.info.labels) == {"keep": "1", "new": "3"}
    assert response.info.updated_at.ToNanoseconds() == later
    assert response.info.created_at.ToNanoseconds() == EPOCH_NS


async def test_update_without_a_mask_replaces_the_labels(served):
    await prepare(served.stub, "a", labels={"old": "1"})
    response = await served.stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="a", labels={"new": "1"})))
    assert dict(response.info.labels) == {"new": "1"}


async def test_an_unknown_kind_in_update_is_read_as_committed_and_ignored(served):
    assert info_from_pb(pb.Info(name="a", kind=pb.UNKNOWN)).kind is Kind.COMMITTED
    await prepare(served.stub, "a")
    response = await served.stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="a", kind=pb.UNKNOWN)))
    assert response.info.kind == pb.ACTIVE


async def test_usage_returns_size_and_inodes(served):
    await prepare(served.stub, "a")
    (served.core.upper_dir(1) / "file").write_bytes(b"x" * 10000)
    response = await served.stub.Usage(pb.UsageRequest(key="a"))
    usage = served.core.usage("a")
    assert (response.size, response.inodes) == (usage.size, usage.inodes) != (0, 0)
    assert response.inodes == 2


async def test_commit_remove_and_cleanup_return_empty(served):
    await prepare(served.stub, "a")
    assert await commit(served.stub, "c", "a") == empty_pb2.Empty()
    assert await served.stub.Remove(pb.RemoveSnapshotRequest(key="c")) == empty_pb2.Empty()
    assert await served.stub.Cleanup(pb.CleanupRequest(snapshotter="pysnap")) == empty_pb2.Empty()
    assert served.core.reaper.wait_idle(10)
    assert list(served.core.snapshots_dir.iterdir()) == []


async def test_the_containerd_namespace_metadata_is_not_required(served):
    await prepare(served.stub, "plain")
    await served.stub.Prepare(pb.PrepareSnapshotRequest(key="namespaced"), metadata=NAMESPACE)
    assert (await served.stub.Stat(pb.StatSnapshotRequest(key="namespaced"))).info.name == "namespaced"
    assert (await served.stub.Stat(pb.StatSnapshotRequest(key="plain"), metadata=NAMESPACE)).info.name == "plain"
    assert len((await list_messages(served.stub))[0].info) == 2


async def test_the_snapshotter_field_is_ignored(served):
    await served.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="anything", key="a"))
    await served.stub.Prepare(pb.PrepareSnapshotRequest(key="b"))
    stat = await served.stub.Stat(pb.StatSnapshotRequest(snapshotter="something-else", key="a"))
    assert stat.info.name == "a"


async def test_keys_are_passed_through_as_opaque_text(served):
    key = "default/7/extract-123456789-AbCd sha256:0123abcd"
    await prepare(served.stub, key)
    assert (await served.stub.Stat(pb.StatSnapshotRequest(key=key))).info.name == key


# =========================================================================== List streaming


async def test_list_of_a_fresh_store_sends_no_message(served):
    assert await list_messages(served.stub) == []


@pytest.mark.parametrize("count, batches", [(1, [1]), (100, [100]), (101, [100, 1]), (250, [100, 100, 50])])
async def test_list_streams_infos_in_batches_of_100(served, count, batches):
    assert LIST_BATCH == 100
    for i in range(count):
        served.core.view(f"s{i:04d}")
    messages = await list_messages(served.stub)
    assert [len(m.info) for m in messages] == batches
    names = [info.name for m in messages for info in m.info]
    assert names == sorted(f"s{i:04d}" for i in range(count))


async def test_list_applies_filters_as_an_or_of_strings(served):
    for key in ("a", "b", "c"):
        await prepare(served.stub, key, labels={"k": key})
    messages = await list_messages(served.stub, "labels.k==a", "name==c")
    assert [i.name for m in messages for i in m.info] == ["a", "c"]


async def test_list_infos_carry_kind_parent_labels_and_timestamps(served):
    await prepare(served.stub, "base-a")
    await commit(served.stub, "base", "base-a", {"x": "1"})
    [message] = await list_messages(served.stub)
    [info] = message.info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("base", "", pb.COMMITTED, {"x": "1"})
    assert info.created_at.ToNanoseconds() == EPOCH_NS


# =========================================================================== errors → status codes


async def test_an_unknown_key_is_not_found(served):
    error = await rpc_error(served.stub.Stat(pb.StatSnapshotRequest(key="nope")))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "snapshot nope does not exist: not found"


async def test_an_existing_key_is_already_exists(served):
    await prepare(served.stub, "a")
    error = await rpc_error(prepare(served.stub, "a"))
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS
    assert error.details() == "snapshot a: already exists"


async def test_an_empty_key_is_invalid_argument(served):
    error = await rpc_error(prepare(served.stub, ""))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().endswith("invalid argument")


async def test_a_parent_that_is_not_committed_is_invalid_argument(served):
    await prepare(served.stub, "p")
    error = await rpc_error(prepare(served.stub, "a", "p"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == 'parent "p" is not committed snapshot: invalid argument'


async def test_an_update_of_a_field_other_than_labels_is_invalid_argument(served):
    await prepare(served.stub, "a")
    error = await rpc_error(
        served.stub.Update(
            pb.UpdateSnapshotRequest(info=pb.Info(name="a"), update_mask=field_mask_pb2.FieldMask(paths=["parent"]))
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert 'cannot update "parent" field on snapshot "a"' in error.details()


async def test_a_filter_that_does_not_parse_is_invalid_argument(served):
    await prepare(served.stub, "a")
    error = await rpc_error(list_messages(served.stub, "name=="))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "parse error" in error.details()


async def test_mounts_of_a_committed_snapshot_is_failed_precondition(served):
    await prepare(served.stub, "a")
    await commit(served.stub, "c", "a")
    error = await rpc_error(served.stub.Mounts(pb.MountsRequest(key="c")))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "requested snapshot c not active or view: failed precondition"


async def test_remove_of_a_parent_is_failed_precondition_mentioning_remove(served):
    await prepare(served.stub, "a")
    await commit(served.stub, "c", "a")
    await served.stub.View(pb.ViewSnapshotRequest(key="v", parent="c"))
    error = await rpc_error(served.stub.Remove(pb.RemoveSnapshotRequest(key="c")))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "remove" in error.details()


async def test_an_unusable_mapping_label_is_unknown(served):
    error = await rpc_error(prepare(served.stub, "a", labels={"containerd.io/snapshot/uidmapping": "bad"}))
    assert error.code() is grpc.StatusCode.UNKNOWN
    assert error.details().endswith(": unknown")


@pytest.mark.parametrize(
    "error_class, code",
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
        (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
        (errors.Unknown, grpc.StatusCode.UNKNOWN),
        (errors.PysnapError, grpc.StatusCode.UNKNOWN),
    ],
)
async def test_each_error_class_leaves_as_its_status_code_with_context_and_class_text(
    served, monkeypatch, error_class, code
):
    def fail(key):
        raise error_class(f"context for {key}")

    monkeypatch.setattr(served.core, "stat", fail)
    error = await rpc_error(served.stub.Stat(pb.StatSnapshotRequest(key="k")))
    assert error.code() is code
    assert error.details() == f"context for k: {error_class.kind}"


def test_a_subclass_of_an_error_class_maps_like_its_base():
    class Gone(errors.NotFound):
        pass

    assert status_of(Gone("x")) is grpc.StatusCode.NOT_FOUND


async def test_an_unexpected_exception_becomes_unknown_and_the_server_keeps_serving(served, monkeypatch):
    def crash(key):
        raise RuntimeError("boom")

    monkeypatch.setattr(served.core, "stat", crash)
    error = await rpc_error(served.stub.Stat(pb.StatSnapshotRequest(key="k")))
    assert error.code() is grpc.StatusCode.UNKNOWN
    assert "boom" in error.details()
    monkeypatch.undo()
    await prepare(served.stub, "k")
    assert (await served.stub.Stat(pb.StatSnapshotRequest(key="k"))).info.name == "k"


async def test_an_unexpected_os_error_in_usage_becomes_unknown(served):
    await prepare(served.stub, "a")
    shutil.rmtree(served.core.upper_dir(1))
    error = await rpc_error(served.stub.Usage(pb.UsageRequest(key="a")))
    assert error.code() is grpc.StatusCode.UNKNOWN
    assert "FileNotFoundError" in error.details()


async def test_an_unexpected_exception_in_list_becomes_unknown(served, monkeypatch):
    def crash(filters):
        raise RuntimeError("list exploded")

    monkeypatch.setattr(served.core, "list", crash)
    error = await rpc_error(list_messages(served.stub))
    assert error.code() is grpc.StatusCode.UNKNOWN
    assert "list exploded" in error.details()
    monkeypatch.undo()
    assert await list_messages(served.stub) == []


async def test_many_concurrent_rpcs_all_complete(served):
    await asyncio.gather(*(prepare(served.stub, f"k{i}") for i in range(50)))
    results = await asyncio.gather(*(served.stub.Stat(pb.StatSnapshotRequest(key=f"k{i}")) for i in range(50)))
    assert {r.info.name for r in results} == {f"k{i}" for i in range(50)}
