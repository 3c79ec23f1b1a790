"""A small asyncio client for the parts of containerd's gRPC API the NRI plugin uses:
images, content, snapshots, diff and leases.  Requests carry the namespace (and,
when given, the lease) as containerd's gRPC metadata; failures come back as
pysnap errors (NotFound, AlreadyExists, …) so callers never see gRPC types.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from grpc import aio

from pysnap._pb.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from pysnap._pb.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from pysnap._pb.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from pysnap._pb.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from pysnap._pb.containerd.types import descriptor_pb2, mount_pb2
from pysnap.errors import NotFound
from pysnap.server import MAX_MESSAGE_BYTES, error_from_status
from snapshotter.mounts import Mount

from .images import Descriptor


def _mounts(messages: Sequence[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options), m.target) for m in messages]


class ContainerdClient:
    def __init__(self, address: Path, snapshotter: str) -> None:
        self.snapshotter = snapshotter
        self._channel = aio.insecure_channel(
            f"unix://{address}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self._diff = diff_pb2_grpc.DiffStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    @staticmethod
    def _metadata(namespace: str, lease: str = "") -> tuple[tuple[str, str], ...]:
        pairs = [("containerd-namespace", namespace)]
        if lease:
            pairs.append(("containerd-lease", lease))
        return tuple(pairs)

    async def _unary(self, method, request, namespace: str, lease: str = "", timeout: float = 30.0):
        try:
            return await method(request, metadata=self._metadata(namespace, lease), timeout=timeout)
        except aio.AioRpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "") from None

    # -- images and content --------------------------------------------------------
    async def image_target(self, namespace: str, name: str) -> Descriptor:
        response = await self._unary(self._images.Get, images_pb2.GetImageRequest(name=name), namespace)
        target = response.image.target
        return Descriptor(target.media_type, target.digest, target.size)

    async def read_blob(self, namespace: str, digest: str, limit: int = 16 << 20) -> bytes:
        chunks, size = [], 0
        try:
            call = self._content.Read(content_pb2.ReadContentRequest(digest=digest),
                                      metadata=self._metadata(namespace), timeout=30.0)
            async for message in call:
                chunks.append(message.data)
                size += len(message.data)
                if size > limit:
                    raise ValueError(f"blob {digest} is larger than {limit} bytes")
        except aio.AioRpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "") from None
        return b"".join(chunks)

    async def set_content_label(self, namespace: str, digest: str, key: str, value: str) -> None:
        request = content_pb2.UpdateRequest(info=content_pb2.Info(digest=digest, labels={key: value}))
        request.update_mask.paths.append(f"labels.{key}")
        await self._unary(self._content.Update, request, namespace)

    # -- snapshots -------------------------------------------------------------------
    async def snapshot_exists(self, namespace: str, key: str) -> bool:
        try:
            await self._unary(self._snapshots.Stat, snapshots_pb2.StatSnapshotRequest(
                snapshotter=self.snapshotter, key=key), namespace)
        except NotFound:
            return False
        return True

    async def prepare(self, namespace: str, key: str, parent: str, labels: dict[str, str] | None = None,
                      lease: str = "") -> list[Mount]:
        response = await self._unary(self._snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}), namespace, lease)
        return _mounts(response.mounts)

    async def view(self, namespace: str, key: str, parent: str, lease: str = "") -> list[Mount]:
        response = await self._unary(self._snapshots.View, snapshots_pb2.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent), namespace, lease)
        return _mounts(response.mounts)

    async def commit(self, namespace: str, name: str, key: str, labels: dict[str, str] | None = None,
                     lease: str = "") -> None:
        await self._unary(self._snapshots.Commit, snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}), namespace, lease)

    async def remove_snapshot(self, namespace: str, key: str) -> None:
        await self._unary(self._snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(
            snapshotter=self.snapshotter, key=key), namespace)

    async def apply_layer(self, namespace: str, layer: Descriptor, mounts: list[Mount], lease: str = "") -> None:
        request = diff_pb2.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size),
            mounts=[mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                    for m in mounts],
        )
        await self._unary(self._diff.Apply, request, namespace, lease, timeout=600.0)

    # -- leases ----------------------------------------------------------------------
    async def create_lease(self, namespace: str, lease_id: str, labels: dict[str, str]) -> None:
        await self._unary(self._leases.Create, leases_pb2.CreateRequest(id=lease_id, labels=labels), namespace)

    async def delete_lease(self, namespace: str, lease_id: str) -> None:
        await self._unary(self._leases.Delete, leases_pb2.DeleteRequest(id=lease_id), namespace)

    async def lease_snapshots(self, namespace: str, lease_id: str) -> list[str]:
        response = await self._unary(self._leases.ListResources,
                                     leases_pb2.ListResourcesRequest(id=lease_id), namespace)
        kind = f"snapshots/{self.snapshotter}"
        return [r.id for r in response.resources if r.type == kind]

    async def leases_with_label(self, namespace: str, label: str) -> dict[str, dict[str, str]]:
        response = await self._unary(self._leases.List, leases_pb2.ListRequest(filters=[f'labels."{label}"']),
                                     namespace)
        return {lease.id: dict(lease.labels) for lease in response.leases}
