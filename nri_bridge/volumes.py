"""Image volumes: turning volume requests into mounted pysnap snapshots.

For each requested volume of a container the manager

1. resolves the image to the chain ID of its top layer (images → manifest →
   config, read through containerd's API), unpacking it into the pysnap
   snapshotter through containerd's diff service when it is not there yet;
2. creates a per-container view (read-only) or active snapshot (a private
   writable layer) on top of it, inside a containerd lease named after the
   container, so that containerd's GC keeps it exactly while the container exists;
3. mounts it under ``mount_root/containers/<container id>/<n>`` on the host and
   returns a bind mount of it (or of its ``subpath``) for the container.

``detach`` undoes all of it; ``reconcile`` detaches containers that disappeared
while the plugin was not running.  Only mounts whose every path lies inside the
pysnap snapshotter's root are ever performed.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pysnap.config import NriConfig
from pysnap.errors import AlreadyExists, InvalidArgument, NotFound, PysnapError
from snapshotter.mounts import Mount

from . import images
from .annotations import VolumeRequest, VolumeRequestError
from .containerd_client import ContainerdClient
from .hostmount import mount_snapshot, unmount_tree

log = logging.getLogger(__name__)

CONTAINER_LABEL = "pysnap.io/nri-container"
SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
GC_EXPIRE_LABEL = "containerd.io/gc.expire"


class VolumeNotReady(Exception):
    """The image is still being unpacked; the runtime should retry the container."""


@dataclass(frozen=True)
class VolumeMount:
    """A bind mount to add to the container."""

    destination: str
    source: str
    readonly: bool

    @property
    def options(self) -> tuple[str, ...]:
        return ("rbind", "rprivate", "ro" if self.readonly else "rw")


def lease_id(container_id: str) -> str:
    return f"pysnap-nri.{container_id}"


def snapshot_key(container_id: str, index: int) -> str:
    return f"pysnap-nri/{container_id}/{index}"


class VolumeManager:
    def __init__(self, config: NriConfig, containerd: ContainerdClient, snapshotter_root: Path) -> None:
        self.config = config
        self.containerd = containerd
        self.snapshotter_root = Path(snapshotter_root)
        self.containers_root = Path(config.mount_root) / "containers"
        self._chains: dict[str, list[images.Layer]] = {}  # image target digest → layers
        self._configs: dict[str, str] = {}  # image target digest → config digest
        self._unpacking: dict[tuple[str, str], asyncio.Task] = {}

    # -- attach / detach ---------------------------------------------------------------
    async def attach(self, container_id: str, namespace: str, requests: list[VolumeRequest]) -> list[VolumeMount]:
        lease = lease_id(container_id)
        try:
            await self.containerd.create_lease(namespace, lease, {CONTAINER_LABEL: container_id})
        except AlreadyExists:  # a retried create for the same container: start clean
            await self.detach(container_id, namespace)
            await self.containerd.create_lease(namespace, lease, {CONTAINER_LABEL: container_id})
        try:
            return [await self._attach_one(container_id, namespace, lease, i, r) for i, r in enumerate(requests)]
        except BaseException:
            await self.detach(container_id, namespace)
            raise

    async def _attach_one(self, container_id: str, namespace: str, lease: str, index: int,
                          request: VolumeRequest) -> VolumeMount:
        key = snapshot_key(container_id, index)
        if request.source_kind == "image":
            mounts = await self._snapshot_of_image(namespace, lease, key, request)
        else:
            try:
                mounts = await self._create(namespace, lease, key, request.source, request)
            except NotFound:
                raise VolumeRequestError(f"annotation {request.annotation}: snapshot {request.source} does not "
                                         f"exist in snapshotter {self.config.snapshotter}") from None
        self._check_mounts(mounts, request)
        host = self.containers_root / container_id / str(index)
        await asyncio.to_thread(mount_snapshot, mounts, host)
        source = host
        if request.subpath:
            source = host / request.subpath
            real = Path(os.path.realpath(source))
            if real != host and host not in real.parents:
                raise VolumeRequestError(f"annotation {request.annotation}: subpath {request.subpath!r} "
                                         f"leaves the volume")
            if not real.is_dir():
                raise VolumeRequestError(f"annotation {request.annotation}: subpath {request.subpath!r} "
                                         f"is not a directory of {request.source}")
            source = real
        return VolumeMount(request.target, str(source), request.readonly)

    async def _create(self, namespace: str, lease: str, key: str, parent: str, request: VolumeRequest) -> list[Mount]:
        """View (or, for a writable volume, prepare) ``key`` on ``parent``; NotFound when the parent is missing."""
        try:
            if request.readonly:
                return await self.containerd.view(namespace, key, parent, lease)
            return await self.containerd.prepare(namespace, key, parent, lease=lease)
        except InvalidArgument as exc:
            raise VolumeRequestError(f"annotation {request.annotation}: {exc.context}") from None

    async def detach(self, container_id: str, namespace: str) -> None:
        await asyncio.to_thread(unmount_tree, self.containers_root / container_id)
        lease = lease_id(container_id)
        try:
            keys = await self.containerd.lease_snapshots(namespace, lease)
        except NotFound:
            return
        for key in keys:
            try:
                await self.containerd.remove_snapshot(namespace, key)
            except NotFound:
                pass
        try:
            await self.containerd.delete_lease(namespace, lease)
        except NotFound:
            pass

    async def reconcile(self, live_container_ids: Iterable[str]) -> list[str]:
        """Detach every container pysnap holds volumes for that no longer exists."""
        live = set(live_container_ids)
        held: dict[str, str] = {}
        for namespace in self.config.namespaces:
            for labels in (await self.containerd.leases_with_label(namespace, CONTAINER_LABEL)).values():
                held[labels[CONTAINER_LABEL]] = namespace
        if self.containers_root.is_dir():
            for entry in os.listdir(self.containers_root):
                held.setdefault(entry, self.config.namespaces[0] if self.config.namespaces else "k8s.io")
        gone = sorted(cid for cid in held if cid not in live)
        for cid in gone:
            log.info("container %s is gone: removing its volumes", cid)
            await self.detach(cid, held[cid])
        return gone

    # -- images ----------------------------------------------------------------------
    async def _snapshot_of_image(self, namespace: str, lease: str, key: str, request: VolumeRequest) -> list[Mount]:
        try:
            target = await self.containerd.image_target(namespace, request.source)
        except NotFound:
            raise VolumeRequestError(f"annotation {request.annotation}: image {request.source} is not known to "
                                     f"containerd in namespace {namespace} (pull it first)") from None
        layers = self._chains.get(target.digest)
        if layers is None:
            layers = await self._resolve(namespace, target, request)
            self._chains[target.digest] = layers
        if not layers:
            raise VolumeRequestError(f"annotation {request.annotation}: image {request.source} has no layers")
        top = layers[-1].chain_id
        try:
            return await self._create(namespace, lease, key, top, request)
        except NotFound:
            pass  # not unpacked into pysnap (yet, or any more)
        await self._wait_for_unpack(namespace, request, layers)
        try:
            return await self._create(namespace, lease, key, top, request)
        except NotFound:
            raise VolumeRequestError(f"annotation {request.annotation}: image {request.source} vanished from "
                                     f"snapshotter {self.config.snapshotter} while being mounted") from None

    async def _resolve(self, namespace: str, target: images.Descriptor, request: VolumeRequest) -> list[images.Layer]:
        try:
            manifest = target
            if target.media_type in images.INDEX_TYPES:
                manifest = images.pick_manifest(await self.containerd.read_blob(namespace, target.digest))
            config, blobs = images.manifest_parts(await self.containerd.read_blob(namespace, manifest.digest))
            ids = images.diff_ids(await self.containerd.read_blob(namespace, config.digest))
            layers = images.layers(blobs, ids)
        except (images.ImageFormatError, NotFound) as exc:
            raise VolumeRequestError(f"annotation {request.annotation}: image {request.source}: {exc}") from None
        self._configs[target.digest] = config.digest
        return layers

    async def _wait_for_unpack(self, namespace: str, request: VolumeRequest, layers: list[images.Layer]) -> None:
        top = layers[-1].chain_id
        task = self._unpacking.get((namespace, top))
        if task is None:
            task = asyncio.create_task(self._unpack(namespace, request.source, layers))
            self._unpacking[(namespace, top)] = task
            task.add_done_callback(lambda _t: self._unpacking.pop((namespace, top), None))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.config.unpack_wait_ms / 1000)
        except asyncio.TimeoutError:
            raise VolumeNotReady(f"image {request.source} is being unpacked into snapshotter "
                                 f"{self.config.snapshotter}; retry shortly") from None
        except PysnapError as exc:
            raise VolumeRequestError(f"annotation {request.annotation}: unpacking {request.source} failed: "
                                     f"{exc}") from None

    async def _unpack(self, namespace: str, image: str, layers: list[images.Layer]) -> None:
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        lease = f"pysnap-nri-unpack.{secrets.token_hex(8)}"
        await self.containerd.create_lease(namespace, lease, {GC_EXPIRE_LABEL: expires.strftime("%Y-%m-%dT%H:%M:%SZ")})
        try:
            parent = ""
            for layer in layers:
                if not await self.containerd.snapshot_exists(namespace, layer.chain_id):
                    await self._unpack_layer(namespace, lease, layer, parent)
                parent = layer.chain_id
            target = await self.containerd.image_target(namespace, image)
            config = self._configs.get(target.digest)
            if config:
                # What containerd's unpacker records: the image keeps its snapshots alive.
                await self.containerd.set_content_label(
                    namespace, config, f"containerd.io/gc.ref.snapshot.{self.config.snapshotter}", parent)
            log.info("unpacked %s (%d layers) into %s", image, len(layers), self.config.snapshotter)
        finally:
            await self.containerd.delete_lease(namespace, lease)

    async def _unpack_layer(self, namespace: str, lease: str, layer: images.Layer, parent: str) -> None:
        key = f"pysnap-nri/extract/{secrets.token_hex(8)} {layer.chain_id}"
        labels = {SNAPSHOT_REF_LABEL: layer.chain_id}
        mounts = await self.containerd.prepare(namespace, key, parent, labels, lease)
        try:
            await self.containerd.apply_layer(namespace, layer.blob, mounts, lease)
            await self.containerd.commit(namespace, layer.chain_id, key, labels, lease)
        except AlreadyExists:
            await self.containerd.remove_snapshot(namespace, key)  # someone else unpacked it meanwhile
        except BaseException:
            try:
                await self.containerd.remove_snapshot(namespace, key)
            except PysnapError:
                pass
            raise

    # -- safety ----------------------------------------------------------------------
    def _check_mounts(self, mounts: list[Mount], request: VolumeRequest) -> None:
        """Refuse any mount that would expose a host path outside pysnap's snapshots."""
        root = str(self.snapshotter_root).rstrip("/") + "/"
        paths: list[str] = []
        for mount in mounts:
            if mount.type == "bind":
                paths.append(mount.source)
            for option in mount.options:
                name, _, value = option.partition("=")
                if name in ("lowerdir", "upperdir", "workdir"):
                    paths.extend(value.split(":"))
        for path in paths:
            if not os.path.normpath(path).startswith(root):
                raise VolumeRequestError(f"annotation {request.annotation}: snapshotter {self.config.snapshotter} "
                                         f"returned a mount of {path}, outside {self.snapshotter_root}; refused")
