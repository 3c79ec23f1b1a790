"""gRPC servicer for containerd.services.snapshots.v1.Snapshots.

A thin translator: protobuf in → domain call in the thread pool → protobuf out.
Errors are not handled here; ``pysnap.server.ErrorMapping`` maps them.  The
``snapshotter`` request field and the ``containerd-namespace`` metadata are
ignored, as containerd's own server does.
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import AsyncIterator

from google.protobuf import empty_pb2

from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from pysnap._pb.containerd.types import mount_pb2
from pysnap.server import RunsInPool
from pysnap.wire import timestamp

from .model import Info, Kind
from .mounts import Mount
from .overlay import OverlaySnapshotter

LIST_BATCH = 100


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=timestamp(info.created_ns),
        updated_at=timestamp(info.updated_ns),
        labels=info.labels,
    )


def info_from_pb(message: pb.Info) -> Info:
    # containerd sends kind UNKNOWN for "not set"; the core ignores kind on Update anyway.
    kind = Kind(message.kind) if message.kind else Kind.COMMITTED
    return Info(message.name, message.parent, kind, 0, 0, dict(message.labels))


class SnapshotsServicer(RunsInPool, pb_grpc.SnapshotsServicer):
    def __init__(self, core: OverlaySnapshotter, executor: Executor) -> None:
        self.core = core
        self._executor = executor

    async def Prepare(self, request, context):
        mounts = await self._run(self.core.prepare, request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def View(self, request, context):
        mounts = await self._run(self.core.view, request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def Mounts(self, request, context):
        return pb.MountsResponse(mounts=mounts_to_pb(await self._run(self.core.mounts, request.key)))

    async def Commit(self, request, context):
        await self._run(self.core.commit, request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    async def Remove(self, request, context):
        await self._run(self.core.remove, request.key)
        return empty_pb2.Empty()

    async def Stat(self, request, context):
        return pb.StatSnapshotResponse(info=info_to_pb(await self._run(self.core.stat, request.key)))

    async def Update(self, request, context):
        info = await self._run(self.core.update, info_from_pb(request.info), list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    async def List(self, request, context) -> AsyncIterator[pb.ListSnapshotsResponse]:
        infos = await self._run(self.core.list, list(request.filters))
        for start in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(i) for i in infos[start:start + LIST_BATCH]])

    async def Usage(self, request, context):
        usage = await self._run(self.core.usage, request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(self, request, context):
        await self._run(self.core.cleanup)
        return empty_pb2.Empty()
