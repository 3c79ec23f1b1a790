"""``pysnap serve snapshotter``: wire the core, the servicer and the server."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from pysnap.config import SnapshotterConfig
from pysnap.daemons import DaemonContext
from pysnap.server import serve

from .overlay import OverlaySnapshotter
from .service import SnapshotsServicer

SERVICE = "containerd.services.snapshots.v1.Snapshots"


async def run(config: SnapshotterConfig, ctx: DaemonContext) -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="pysnap-snapshotter")
    core = await loop.run_in_executor(executor, OverlaySnapshotter, config)
    servicer = SnapshotsServicer(core, executor)
    ctx.grpc_services = (SERVICE,)
    ctx.probes.append(lambda: loop.run_in_executor(executor, core.count_by_kind))
    ctx.metrics.gauge("snapshots", "Snapshots by kind.", ("kind",),
                      lambda: {(kind.label,): n for kind, n in core.count_by_kind().items()})

    async def shutdown() -> None:
        await loop.run_in_executor(executor, core.close)
        executor.shutdown(wait=True)

    try:
        await serve(config.address, lambda server: pb_grpc.add_SnapshotsServicer_to_server(servicer, server), ctx,
                    socket_group=config.socket_group, on_stop=shutdown)
    except BaseException:
        executor.shutdown(wait=False)
        raise
