"""The image-volume NRI plugin: NRI messages in, volume work out, adjustments back.

A thin translator between NRI's protobuf messages and the domain (annotations,
policy, VolumeManager).  Every runtime request is answered well inside NRI's
2 s budget: volumes of already-unpacked images are mounted inline; an image
still being unpacked fails the container with a retriable error while the
unpack goes on in the background; clean-up after Synchronize runs after the reply.
"""
from __future__ import annotations

import asyncio
import logging
import time

from pysnap._pb.nri import api_pb2 as nri
from pysnap.config import Config, ConfigError, NriConfig
from pysnap.metrics import Registry

from .annotations import VolumeRequestError, check_policy, requested_volumes
from .volumes import VolumeManager, VolumeNotReady

log = logging.getLogger(__name__)

CRI_NAMESPACE = "k8s.io"  # the only NRI domain containerd registers
ALL_EVENTS = 0x7FF


def event_bit(event: int) -> int:
    return 1 << (event - 1)


VOLUME_EVENTS = event_bit(nri.CREATE_CONTAINER) | event_bit(nri.REMOVE_CONTAINER)


class PluginError(Exception):
    """Answered to the runtime as an error status (fails the CRI call)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


INVALID_ARGUMENT = 3
UNAVAILABLE = 14
INTERNAL = 13


class ImageVolumePlugin:
    def __init__(self, config: NriConfig, volumes: VolumeManager, log_events: bool = False,
                 metrics: Registry | None = None) -> None:
        self.config = config
        self.volumes = volumes
        self.log_events = log_events
        self._background: set[asyncio.Task] = set()
        self._sync_pods: list[nri.PodSandbox] = []
        self._sync_containers: list[nri.Container] = []
        metrics = metrics or Registry()
        self._events = metrics.counter("nri_events_total", "NRI requests and events received, by kind.", ("event",))
        self._create_seconds = metrics.histogram(
            "nri_create_container_seconds", "Time to answer CreateContainer, by outcome.", ("outcome",))
        self._volumes = metrics.counter("nri_volumes_mounted_total", "Volumes added to containers.")

    @property
    def events(self) -> int:
        return ALL_EVENTS if self.log_events else VOLUME_EVENTS

    # -- requests ----------------------------------------------------------------------
    async def configure(self, request: nri.ConfigureRequest) -> nri.ConfigureResponse:
        log.info("configured by %s %s", request.runtime_name, request.runtime_version)
        if request.config.strip():  # a pre-registered plugin's conf file, as text
            try:
                self.config = Config.from_toml(request.config, "NRI plugin configuration").nri
            except ConfigError as exc:
                raise PluginError(INVALID_ARGUMENT, f"pysnap: {exc}") from None
            self.volumes.config = self.config
        return nri.ConfigureResponse(events=self.events)

    async def synchronize(self, request: nri.SynchronizeRequest) -> nri.SynchronizeResponse:
        self._events.inc(event="SYNCHRONIZE")
        self._sync_pods.extend(request.pods)
        self._sync_containers.extend(request.containers)
        if request.more:  # NRI 0.8 split sync: acknowledge, act on the last part
            return nri.SynchronizeResponse(more=True)
        containers, self._sync_containers, self._sync_pods = self._sync_containers, [], []
        live = [c.id for c in containers]
        log.info("synchronized: %d containers exist", len(live))
        self._in_background(self.volumes.reconcile(live), "clean-up after synchronize")
        return nri.SynchronizeResponse()

    async def create_container(self, request: nri.CreateContainerRequest) -> nri.CreateContainerResponse:
        started = time.perf_counter()
        self._events.inc(event="CREATE_CONTAINER")
        pod, container = request.pod, request.container
        response = nri.CreateContainerResponse()
        outcome = "error"
        try:
            wanted = requested_volumes(pod.annotations, container.annotations, container.name)
            if wanted:
                check_policy(wanted, CRI_NAMESPACE, self.config)
                for volume in await self.volumes.attach(container.id, CRI_NAMESPACE, wanted):
                    response.adjust.mounts.add(destination=volume.destination, type="bind", source=volume.source,
                                               options=volume.options)
                    self._volumes.inc()
            outcome = "mounted" if wanted else "none"
        except VolumeRequestError as exc:
            outcome = "refused"
            raise PluginError(INVALID_ARGUMENT, f"pysnap: {exc}") from None
        except VolumeNotReady as exc:
            outcome = "unpacking"
            raise PluginError(UNAVAILABLE, f"pysnap: {exc}") from None
        finally:
            elapsed = time.perf_counter() - started
            self._create_seconds.observe(elapsed, outcome=outcome)
            log.debug("CreateContainer %s handled in %.3f ms (%s)", container.id, elapsed * 1000, outcome)
        if self.log_events or response.adjust.mounts:
            log.info("CreateContainer pod=%s/%s container=%s (%s): %s", pod.namespace, pod.name, container.name,
                     container.id, _describe_mounts(response.adjust.mounts) or "no volumes")
        return response

    async def update_container(self, request: nri.UpdateContainerRequest) -> nri.UpdateContainerResponse:
        self._log_event("UPDATE_CONTAINER", request.pod, request.container)
        return nri.UpdateContainerResponse()

    async def stop_container(self, request: nri.StopContainerRequest) -> nri.StopContainerResponse:
        self._log_event("STOP_CONTAINER", request.pod, request.container)
        return nri.StopContainerResponse()

    async def state_change(self, event: nri.StateChangeEvent) -> nri.Empty:
        self._log_event(nri.Event.Name(event.event), event.pod, event.container)
        if event.event == nri.REMOVE_CONTAINER and event.container.id:
            # Reply first: the runtime waits for us while holding its locks.
            self._in_background(self.volumes.detach(event.container.id, CRI_NAMESPACE),
                                f"removing volumes of {event.container.id}")
        return nri.Empty()

    async def shutdown(self) -> None:
        for task in list(self._background):
            await asyncio.wait({task}, timeout=10)

    # -- helpers -----------------------------------------------------------------------
    def _in_background(self, work, what: str) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _log_event(self, name: str, pod: nri.PodSandbox, container: nri.Container) -> None:
        self._events.inc(event=name)
        if self.log_events:
            who = f"pod={pod.namespace}/{pod.name}" if pod.name else "pod=-"
            if container.id:
                who += f" container={container.name} ({container.id})"
            log.info("%s %s", name, who)


def _describe_mounts(mounts) -> str:
    return ", ".join(f"{m.source} -> {m.destination} ({','.join(m.options)})" for m in mounts)
