"""``pysnap serve snapshotter``: wire the core, the servicer and the server."""
from __future__ import annotations

from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from pysnap.config import SnapshotterConfig
from pysnap.daemons import DaemonContext
from pysnap.server import in_pool, serve, worker_pool

from .overlay import OverlaySnapshotter
from .service import SnapshotsServicer

SERVICE = "containerd.services.snapshots.v1.Snapshots"


async def run(config: SnapshotterConfig, ctx: DaemonContext) -> None:
    async with worker_pool(config.workers, "pysnap-snapshotter") as executor:
        core = await in_pool(executor, OverlaySnapshotter, config)
        servicer = SnapshotsServicer(core, executor)
        ctx.grpc_services = (SERVICE,)
        ctx.probes.append(lambda: in_pool(executor, core.count_by_kind))
        ctx.metrics.gauge("snapshots", "Snapshots by kind.", ("kind",),
                          lambda: {(kind.label,): n for kind, n in core.count_by_kind().items()})
        await serve(config.address, lambda server: pb_grpc.add_SnapshotsServicer_to_server(servicer, server), ctx,
                    socket_group=config.socket_group, on_stop=lambda: in_pool(executor, core.close))
