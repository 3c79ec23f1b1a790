"""``pysnap serve content``: wire the store, the servicer and the server."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from pysnap._pb.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from pysnap.config import ContentConfig
from pysnap.daemons import DaemonContext
from pysnap.server import serve

from .service import ContentServicer
from .store import ContentStore

SERVICE = "containerd.services.content.v1.Content"


async def run(config: ContentConfig, ctx: DaemonContext) -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="pysnap-content")
    store = await loop.run_in_executor(executor, ContentStore, config)
    servicer = ContentServicer(store, executor, config.lock_wait_ms, metrics=ctx.metrics)
    ctx.grpc_services = (SERVICE,)
    ctx.probes.append(lambda: loop.run_in_executor(executor, store.counts))
    ctx.metrics.gauge("content_blobs", "Committed blobs and their total size.", ("what",),
                      lambda: {(k,): v for k, v in store.counts().items()})

    async def shutdown() -> None:
        await loop.run_in_executor(executor, store.close)
        executor.shutdown(wait=True)

    try:
        await serve(config.address, lambda server: pb_grpc.add_ContentServicer_to_server(servicer, server), ctx,
                    socket_group=config.socket_group, on_stop=shutdown)
    except BaseException:
        executor.shutdown(wait=False)
        raise
