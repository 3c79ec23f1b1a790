"""``pysnap serve content``: wire the store, the servicer and the server."""
from __future__ import annotations

from pysnap._pb.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from pysnap.config import ContentConfig
from pysnap.daemons import DaemonContext
from pysnap.server import in_pool, serve, worker_pool

from .service import ContentServicer
from .store import ContentStore

SERVICE = "containerd.services.content.v1.Content"


async def run(config: ContentConfig, ctx: DaemonContext) -> None:
    async with worker_pool(config.workers, "pysnap-content") as executor:
        store = await in_pool(executor, ContentStore, config)
        servicer = ContentServicer(store, executor, config.lock_wait_ms, metrics=ctx.metrics)
        ctx.grpc_services = (SERVICE,)
        ctx.probes.append(lambda: in_pool(executor, store.counts))
        ctx.metrics.gauge("content_blobs", "Committed blobs and their total size.", ("what",),
                          lambda: {(k,): v for k, v in store.counts().items()})
        await serve(config.address, lambda server: pb_grpc.add_ContentServicer_to_server(servicer, server), ctx,
                    socket_group=config.socket_group, on_stop=lambda: in_pool(executor, store.close))
