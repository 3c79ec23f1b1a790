"""``pysnap serve content``: wire the store, the servicer and the server."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from pysnap._pb.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from pysnap.config import ContentConfig
from pysnap.server import serve

from .service import ContentServicer
from .store import ContentStore


async def run(config: ContentConfig) -> None:
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="pysnap-content")
    store = await asyncio.get_running_loop().run_in_executor(executor, ContentStore, config)
    servicer = ContentServicer(store, executor, config.lock_wait_ms)

    async def shutdown() -> None:
        await asyncio.get_running_loop().run_in_executor(executor, store.close)
        executor.shutdown(wait=True)

    await serve(
        config.address,
        lambda server: pb_grpc.add_ContentServicer_to_server(servicer, server),
        name="content",
        socket_group=config.socket_group,
        on_stop=shutdown,
    )
