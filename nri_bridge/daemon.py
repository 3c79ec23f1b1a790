"""``pysnap serve nri``: the NRI plugin process."""
from __future__ import annotations

import logging
from pathlib import Path

from pysnap.config import NriConfig
from pysnap.daemons import DaemonContext

from .containerd_client import ContainerdClient
from .plugin import ImageVolumePlugin
from .stub import NriStub, launched_fd
from .volumes import VolumeManager

log = logging.getLogger(__name__)


async def run(config: NriConfig, snapshotter_root: Path, ctx: DaemonContext, log_events: bool = False) -> None:
    containerd = ContainerdClient(config.containerd_address, config.snapshotter)
    volumes = VolumeManager(config, containerd, snapshotter_root)
    plugin = ImageVolumePlugin(config, volumes, log_events=log_events, metrics=ctx.metrics)
    Path(config.mount_root).mkdir(parents=True, exist_ok=True)
    stub = NriStub(plugin, config.plugin_name, config.plugin_index, socket_path=config.socket, fd=launched_fd(),
                   reconnect_max=config.reconnect_max_ms / 1000)
    ctx.metrics.gauge("nri_connected", "1 while registered with the runtime.", (),
                      lambda: {(): 1.0 if stub.connection is not None and stub.registrations else 0.0})
    where = f"fd {stub.fd}" if stub.fd is not None else str(config.socket)
    log.info("NRI plugin %s-%s starting on %s", stub.index, stub.name, where)
    # Ready once started: registration waits for containerd, which is ordered after us
    # in `serve all` set-ups and may restart at any time.
    ctx.ready.set()
    try:
        await stub.run(ctx.stopping)
    finally:
        await containerd.close()
        log.info("NRI plugin stopped")
