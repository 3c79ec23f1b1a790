"""`python -m bench.floor_server SOCKET`: the cheapest possible Python snapshots server, as a latency floor.

A grpc.aio server on a unix socket whose Stat does what pysnap's servicers do around their work — one hop to a
thread pool and back — and nothing else (no store, no interceptor, no logging).  Timing it with the same client
as pysnap shows how much of pysnap's per-RPC time is Python gRPC itself on this machine.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from grpc import aio

from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc


class FloorSnapshots(pb_grpc.SnapshotsServicer):
    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=8)

    async def Stat(self, request, context):
        await asyncio.get_running_loop().run_in_executor(self.executor, int)
        return pb.StatSnapshotResponse(info=pb.Info(name=request.key, kind=pb.COMMITTED))


async def serve(socket: str) -> None:
    server = aio.server()
    pb_grpc.add_SnapshotsServicer_to_server(FloorSnapshots(), server)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
