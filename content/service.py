"""gRPC servicer for containerd.services.content.v1.Content.

A thin translator: protobuf in → store call in the thread pool → protobuf out.
Errors are mapped by ``pysnap.server.ErrorMapping``.  The ``containerd-namespace``
metadata is never required (containerd's GC sends none).
"""
from __future__ import annotations

import asyncio
import random
from concurrent.futures import Executor
from typing import AsyncIterator

from google.protobuf import empty_pb2

from pysnap._pb.containerd.services.content.v1 import content_pb2 as pb
from pysnap._pb.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from pysnap.errors import InvalidArgument, Unavailable
from pysnap.metrics import Registry
from pysnap.server import RunsInPool
from pysnap.wire import timestamp

from .ingest import WriteSession
from .model import BlobInfo, IngestStatus, WriteAction, WriteRequest, WriteResponse
from .store import ContentStore

LIST_BATCH = 100


def info_to_pb(info: BlobInfo) -> pb.Info:
    return pb.Info(digest=info.digest, size=info.size, created_at=timestamp(info.created_ns),
                   updated_at=timestamp(info.updated_ns), labels=info.labels)


def status_to_pb(status: IngestStatus) -> pb.Status:
    return pb.Status(ref=status.ref, offset=status.offset, total=status.total, expected=status.expected,
                     started_at=timestamp(status.started_ns), updated_at=timestamp(status.updated_ns))


def write_request_from_pb(message: pb.WriteContentRequest) -> WriteRequest:
    try:
        action = WriteAction(message.action)
    except ValueError:
        raise InvalidArgument(f"unknown write action {message.action}") from None
    return WriteRequest(action, message.ref, message.total, message.expected, message.offset, message.data,
                        dict(message.labels))


def write_response_to_pb(response: WriteResponse) -> pb.WriteContentResponse:
    message = pb.WriteContentResponse(action=int(response.action), offset=response.offset, total=response.total,
                                      digest=response.digest)
    if response.started_ns:
        message.started_at.CopyFrom(timestamp(response.started_ns))
        message.updated_at.CopyFrom(timestamp(response.updated_ns))
    return message


class ContentServicer(RunsInPool, pb_grpc.ContentServicer):
    def __init__(self, store: ContentStore, executor: Executor, lock_wait_ms: int = 1000,
                 metrics: Registry | None = None) -> None:
        self.store = store
        self._executor = executor
        self._lock_wait = lock_wait_ms / 1000
        metrics = metrics or Registry()
        self._bytes_written = metrics.counter("content_ingested_bytes_total", "Bytes received by Write.")
        self._bytes_read = metrics.counter("content_read_bytes_total", "Bytes sent by Read.")

    async def Info(self, request, context):
        info = self.store.cached_info(request.digest) or await self._run(self.store.info, request.digest)
        return pb.InfoResponse(info=info_to_pb(info))

    async def Update(self, request, context):
        info = await self._run(self.store.update, request.info.digest, dict(request.info.labels),
                               list(request.update_mask.paths))
        return pb.UpdateResponse(info=info_to_pb(info))

    async def List(self, request, context) -> AsyncIterator[pb.ListContentResponse]:
        infos = await self._run(self.store.list, list(request.filters))
        for start in range(0, len(infos), LIST_BATCH):
            yield pb.ListContentResponse(info=[info_to_pb(i) for i in infos[start:start + LIST_BATCH]])

    async def Delete(self, request, context):
        await self._run(self.store.delete, request.digest)
        return empty_pb2.Empty()

    async def Read(self, request, context) -> AsyncIterator[pb.ReadContentResponse]:
        reader = await self._run_to_completion(self.store.open_reader, request.digest, request.offset, request.size)
        try:
            chunk = reader.next_chunk()  # read when the range was opened
            while chunk:
                # containerd's server reports offsets relative to the request.
                yield pb.ReadContentResponse(offset=reader.position - len(chunk) - reader.start, data=chunk)
                self._bytes_read.inc(len(chunk))
                chunk = await self._run(reader.next_chunk)
        finally:
            reader.close()

    async def Status(self, request, context):
        return pb.StatusResponse(status=status_to_pb(await self._run(self.store.status, request.ref)))

    async def ListStatuses(self, request, context):
        statuses = await self._run(self.store.list_statuses, list(request.filters))
        return pb.ListStatusesResponse(statuses=[status_to_pb(s) for s in statuses])

    async def Abort(self, request, context):
        await self._run(self.store.abort, request.ref)
        return empty_pb2.Empty()

    async def Write(self, request_iterator, context) -> AsyncIterator[pb.WriteContentResponse]:
        session: WriteSession | None = None
        try:
            async for message in request_iterator:
                request = write_request_from_pb(message)
                if session is None:
                    session = await self._open(request)
                response = await self._run_to_completion(session.handle, request)
                self._bytes_written.inc(len(request.data))
                yield write_response_to_pb(response)
                if session.done:
                    break
        finally:
            # Also when the client cancelled: grpc then cancels this task too,
            # possibly while it waits here.
            if session is not None:
                await self._run_to_completion(session.close)

    async def _open(self, first: WriteRequest) -> WriteSession:
        """Open the ingest; a ref held by another stream is retried for a while
        (containerd's client half-closes a stream and reopens the ref at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_wait
        delay = 0.002
        while True:
            opening = loop.run_in_executor(self._executor, WriteSession, self.store, first)
            try:
                return await asyncio.shield(opening)
            except asyncio.CancelledError:
                opening.add_done_callback(self._close_abandoned)
                raise
            except Unavailable:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
                await asyncio.sleep(min(random.uniform(delay / 2, delay), remaining))
                delay = min(delay * 2, 0.128)

    def _close_abandoned(self, opening: "asyncio.Future[WriteSession]") -> None:
        """A session opened for an RPC cancelled meanwhile: release its ref."""
        if not opening.cancelled() and opening.exception() is None:
            self._executor.submit(opening.result().close)
