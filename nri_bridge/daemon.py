"""``pysnap serve nri``: the NRI plugin process."""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from pysnap.config import NriConfig
from pysnap.server import sd_notify

from .containerd_client import ContainerdClient
from .plugin import ImageVolumePlugin
from .stub import NriStub, launched_fd
from .volumes import VolumeManager

log = logging.getLogger(__name__)


async def run(config: NriConfig, snapshotter_root: Path, log_events: bool = False) -> None:
    containerd = ContainerdClient(config.containerd_address, config.snapshotter)
    volumes = VolumeManager(config, containerd, snapshotter_root)
    plugin = ImageVolumePlugin(config, volumes, log_events=log_events)
    stub = NriStub(plugin, config.plugin_name, config.plugin_index, socket_path=config.socket, fd=launched_fd(),
                   reconnect_max=config.reconnect_max_ms / 1000,
                   on_registered=lambda: sd_notify("READY=1"))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    where = f"fd {stub.fd}" if stub.fd is not None else str(config.socket)
    log.info("NRI plugin %s-%s starting on %s", stub.index, stub.name, where)
    try:
        await stub.run(stopping)
    finally:
        sd_notify("STOPPING=1")
        await containerd.close()
        log.info("NRI plugin stopped")
