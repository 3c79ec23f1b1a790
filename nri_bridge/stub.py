"""The NRI handshake and event loop of a plugin.

    connect ──► RegisterPlugin ──► (runtime) Configure ──► Synchronize ──► events …

Two ways to be connected:

* external (a systemd unit): connect to the runtime's NRI socket, retrying until
  it exists; when the runtime goes away (containerd restart), reconnect with
  backoff and go through the whole handshake again — the runtime re-synchronizes
  us, which is where containers removed meanwhile are noticed;
* pre-registered (launched by containerd from ``/opt/nri/plugins``): the socket
  is fd ``$NRI_PLUGIN_SOCKET``; when it closes the plugin exits, since the
  runtime never relaunches it.

The runtime's requests are served concurrently with our own RegisterPlugin call
(Configure may arrive before its reply).
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path
from typing import Awaitable, Callable

from pysnap._pb.nri import api_pb2 as nri

from .plugin import ImageVolumePlugin, PluginError
from .transport import ConnectionClosed, NriConnection, TtrpcError

log = logging.getLogger(__name__)

PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
REGISTER_TIMEOUT = 5.0


def launched_fd() -> int | None:
    """The socket fd when containerd launched us as a pre-registered plugin."""
    value = os.environ.get("NRI_PLUGIN_SOCKET")
    return int(value) if value else None


class NriStub:
    def __init__(
        self,
        plugin: ImageVolumePlugin,
        name: str,
        index: str,
        socket_path: Path | None = None,
        fd: int | None = None,
        reconnect_max: float = 5.0,
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        self.plugin = plugin
        self.name = os.environ.get("NRI_PLUGIN_NAME", name)
        self.index = os.environ.get("NRI_PLUGIN_IDX", index)
        self.socket_path = socket_path
        self.fd = fd
        self.reconnect_max = reconnect_max
        self._on_registered = on_registered
        self.connection: NriConnection | None = None
        self.registrations = 0

    def _handlers(self) -> dict[tuple[str, str], Callable[[bytes, object], Awaitable[bytes]]]:
        def serve(request_type, method):
            async def handler(payload: bytes, _metadata: object) -> bytes:
                try:
                    response = await method(request_type.FromString(payload))
                except PluginError as exc:
                    raise TtrpcError(exc.code, str(exc)) from None
                return response.SerializeToString()
            return handler

        plugin = self.plugin

        async def shutdown(_request: nri.Empty) -> nri.Empty:
            return nri.Empty()

        table = {
            "Configure": (nri.ConfigureRequest, plugin.configure),
            "Synchronize": (nri.SynchronizeRequest, plugin.synchronize),
            "CreateContainer": (nri.CreateContainerRequest, plugin.create_container),
            "UpdateContainer": (nri.UpdateContainerRequest, plugin.update_container),
            "StopContainer": (nri.StopContainerRequest, plugin.stop_container),
            "StateChange": (nri.StateChangeEvent, plugin.state_change),
            "Shutdown": (nri.Empty, shutdown),
        }
        return {(PLUGIN_SERVICE, name): serve(*entry) for name, entry in table.items()}

    async def _connect(self, stopping: asyncio.Event) -> NriConnection | None:
        if self.fd is not None:
            return await NriConnection.from_fd(self.fd, self._handlers(), name="nri")
        delay = 0.1
        while not stopping.is_set():
            try:
                return await NriConnection.connect(str(self.socket_path), self._handlers(), name="nri")
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                log.debug("NRI socket %s not ready: %s", self.socket_path, exc)
            await _sleep_or_stop(stopping, delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max)
        return None

    async def run(self, stopping: asyncio.Event) -> None:
        """Serve the runtime until ``stopping`` is set (or, when launched, until it drops us)."""
        while not stopping.is_set():
            connection = await self._connect(stopping)
            if connection is None:
                break
            self.connection = connection
            try:
                request = nri.RegisterPluginRequest(plugin_name=self.name, plugin_idx=self.index)
                await connection.call(RUNTIME_SERVICE, "RegisterPlugin", request.SerializeToString(),
                                      timeout=REGISTER_TIMEOUT)
                self.registrations += 1
                log.info("registered with the runtime as %s-%s", self.index, self.name)
                if self._on_registered:
                    self._on_registered()
                await _wait_either(connection.closed.wait(), stopping.wait())
            except (ConnectionClosed, TtrpcError, asyncio.TimeoutError) as exc:
                log.warning("NRI registration failed: %s", exc)
            finally:
                await connection.close()
                self.connection = None
            if self.fd is not None:
                log.info("the runtime closed our connection; a launched plugin exits")
                break
            if not stopping.is_set():
                log.warning("disconnected from the runtime; reconnecting")
                await _sleep_or_stop(stopping, 0.2)
        await self.plugin.shutdown()


async def _sleep_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def _wait_either(*awaitables: Awaitable) -> None:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
