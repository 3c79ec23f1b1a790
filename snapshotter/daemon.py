"""``pysnap serve snapshotter``: wire the core, the servicer and the server."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from pysnap.config import SnapshotterConfig
from pysnap.server import serve

from .overlay import OverlaySnapshotter
from .service import SnapshotsServicer


async def run(config: SnapshotterConfig) -> None:
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="pysnap-snapshotter")
    core = OverlaySnapshotter(config)
    servicer = SnapshotsServicer(core, executor)

    async def shutdown() -> None:
        await asyncio.get_running_loop().run_in_executor(executor, core.close)
        executor.shutdown(wait=True)

    await serve(
        config.address,
        lambda server: pb_grpc.add_SnapshotsServicer_to_server(servicer, server),
        name="snapshotter",
        socket_group=config.socket_group,
        on_stop=shutdown,
    )
