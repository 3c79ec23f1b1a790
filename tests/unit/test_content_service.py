"""The content store's gRPC layer, in process.

A ``ContentServicer`` over a ``ContentStore`` in ``tmp_path`` is served by
grpc.aio on a unix socket in ``tmp_path``, configured as ``pysnap.server.serve``
configures it (the ``ErrorMapping`` interceptor, 16 MiB message limits), and is
called through the generated stub the way containerd's proxy calls it.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio

from content.service import LIST_BATCH, ContentServicer
from content.store import ContentStore
from pysnap import errors
from pysnap._pb.containerd.services.content.v1 import content_pb2 as pb
from pysnap._pb.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from pysnap.config import ContentConfig
from pysnap.server import MAX_MESSAGE_BYTES, STATUS_OF, ErrorMapping

MiB = 1 << 20
STAT, WRITE, COMMIT = pb.WriteAction.STAT, pb.WriteAction.WRITE, pb.WriteAction.COMMIT
MESSAGE_LIMITS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Content:
    """A running server and a client stub for it."""

    def __init__(self, store: ContentStore, servicer: ContentServicer, stub: pb_grpc.ContentStub) -> None:
        self.store = store
        self.servicer = servicer
        self.stub = stub

    async def write_blob(self, data: bytes, ref: str | None = None, labels: dict[str, str] | None = None) -> str:
        responses = [r async for r in self.stub.Write(iter([
            pb.WriteContentRequest(action=STAT, ref=ref or f"w-{sha256(data)}", total=len(data)),
            pb.WriteContentRequest(action=COMMIT, offset=0, total=len(data), data=data, labels=labels or {}),
        ]))]
        return responses[-1].digest


@pytest.fixture
async def serve(tmp_path: Path):
    """``await serve(lock_wait_ms=...)`` starts a server; everything is stopped at teardown."""
    cleanups = []

    async def start(lock_wait_ms: int = 1000) -> Content:
        index = len(cleanups)
        store = ContentStore(ContentConfig(root=tmp_path / f"root{index}", durable_metadata=False))
        executor = ThreadPoolExecutor(max_workers=8)
        servicer = ContentServicer(store, executor, lock_wait_ms)
        server = aio.server(interceptors=[ErrorMapping()], options=MESSAGE_LIMITS)
        pb_grpc.add_ContentServicer_to_server(servicer, server)
        address = f"unix://{tmp_path}/c{index}.sock"
        server.add_insecure_port(address)
        await server.start()
        channel = aio.insecure_channel(address, options=MESSAGE_LIMITS)

        async def stop() -> None:
            await channel.close()
            await server.stop(None)
            executor.shutdown(wait=True)
            store.close()

        cleanups.append(stop)
        return Content(store, servicer, pb_grpc.ContentStub(channel))

    yield start
    for stop in reversed(cleanups):
        await stop()


@pytest.fixture
async def content(serve) -> Content:
    return await serve()


async def rpc_error(awaitable) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await awaitable
    return caught.value


async def drain(stream) -> list:
    return [message async for message in stream]


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize("error_class", list(STATUS_OF), ids=lambda c: c.__name__)
async def test_each_error_class_leaves_as_its_status_code_with_its_message(content, monkeypatch, error_class):
    def fail(digest):
        raise error_class(f"content {digest}")

    monkeypatch.setattr(content.store, "info", fail)
    digest = sha256(b"x")
    error = await rpc_error(content.stub.Info(pb.InfoRequest(digest=digest)))
    assert error.code() == STATUS_OF[error_class]
    assert error.details() == f"content {digest}: {error_class.kind}"


@pytest.mark.parametrize(
    ("error_class", "code"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
        (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
        (errors.Unknown, grpc.StatusCode.UNKNOWN),
    ],
)
def test_the_error_mapping_is_containerds(error_class, code):
    assert STATUS_OF[error_class] == code


async def test_an_unexpected_exception_is_unknown_with_its_text(content, monkeypatch):
    def fail(digest):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(content.store, "info", fail)
    error = await rpc_error(content.stub.Info(pb.InfoRequest(digest=sha256(b"x"))))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert error.details() == "RuntimeError: disk on fire"


async def test_errors_in_streaming_rpcs_are_mapped_too(content):
    error = await rpc_error(drain(content.stub.List(pb.ListContentRequest(filters=["labels.x=="]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- Info, Update, List, Delete


async def test_info_of_an_invalid_digest_is_invalid_argument(content):
    error = await rpc_error(content.stub.Info(pb.InfoRequest(digest="sha256:nope")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith('"sha256:nope" failed validation')


async def test_info_of_a_missing_blob_is_not_found(content):
    digest = sha256(b"missing")
    error = await rpc_error(content.stub.Info(pb.InfoRequest(digest=digest)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"content {digest}: not found"


async def test_info_reports_size_labels_and_nanosecond_times(content):
    digest = await content.write_blob(b"abcdef", labels={"k": "v"})
    info = (await content.stub.Info(pb.InfoRequest(digest=digest))).info
    stored = content.store.info(digest)
    assert (info.digest, info.size, dict(info.labels)) == (digest, 6, {"k": "v"})
    assert info.created_at.seconds * 10**9 + info.created_at.nanos == stored.created_ns
    assert info.updated_at.seconds * 10**9 + info.updated_at.nanos == stored.updated_ns


async def test_update_applies_the_field_mask(content):
    digest = await content.write_blob(b"abc", labels={"k1": "v1", "k2": "v2"})
    response = await content.stub.Update(pb.UpdateRequest(
        info=pb.Info(digest=digest, labels={"k1": "new"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.k1", "labels.k2"])))
    assert dict(response.info.labels) == {"k1": "new"}


async def test_update_of_another_field_is_invalid_argument(content):
    digest = await content.write_blob(b"abc")
    error = await rpc_error(content.stub.Update(pb.UpdateRequest(
        info=pb.Info(digest=digest), update_mask=field_mask_pb2.FieldMask(paths=["size"]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_sends_batches_of_100(content):
    digests = [await content.write_blob(f"blob {i}".encode()) for i in range(2 * LIST_BATCH + 1)]
    batches = await drain(content.stub.List(pb.ListContentRequest()))
    assert LIST_BATCH == 100
    assert [len(batch.info) for batch in batches] == [100, 100, 1]
    assert [info.digest for batch in batches for info in batch.info] == sorted(digests)


async def test_list_of_an_empty_store_sends_nothing(content):
    assert await drain(content.stub.List(pb.ListContentRequest())) == []


async def test_list_applies_filters(content):
    labelled = await content.write_blob(b"a", labels={"containerd.io/gc.root": "1"})
    await content.write_blob(b"b")
    batches = await drain(content.stub.List(pb.ListContentRequest(filters=['labels."containerd.io/gc.root"'])))
    assert [info.digest for batch in batches for info in batch.info] == [labelled]


async def test_delete_of_a_missing_blob_succeeds(content):
    await content.stub.Delete(pb.DeleteContentRequest(digest=sha256(b"missing")))


async def test_delete_removes_a_blob(content):
    digest = await content.write_blob(b"abc")
    await content.stub.Delete(pb.DeleteContentRequest(digest=digest))
    error = await rpc_error(content.stub.Info(pb.InfoRequest(digest=digest)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------- Read


async def test_read_streams_chunks_of_at_most_1_mib_with_offsets_relative_to_the_request(content):
    data = os.urandom(2 * MiB + MiB // 2)
    digest = await content.write_blob(data)
    responses = await drain(content.stub.Read(pb.ReadContentRequest(digest=digest, offset=100)))
    assert all(len(r.data) <= MiB for r in responses)
    assert [r.offset for r in responses] == [0, MiB, 2 * MiB]
    assert b"".join(r.data for r in responses) == data[100:]


async def test_read_of_a_range_returns_exactly_that_range(content):
    data = os.urandom(3 * MiB)
    digest = await content.write_blob(data)
    responses = await drain(content.stub.Read(pb.ReadContentRequest(digest=digest, offset=MiB - 1, size=MiB + 2)))
    assert b"".join(r.data for r in responses) == data[MiB - 1:2 * MiB + 1]
    assert responses[0].offset == 0


async def test_read_at_the_end_sends_nothing(content):
    digest = await content.write_blob(b"0123456789")
    assert await drain(content.stub.Read(pb.ReadContentRequest(digest=digest, offset=10))) == []


async def test_read_past_the_end_is_out_of_range(content):
    digest = await content.write_blob(b"0123456789")
    error = await rpc_error(drain(content.stub.Read(pb.ReadContentRequest(digest=digest, offset=11))))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error.details() == "read past object length 10 bytes: out of range"


async def test_read_of_a_missing_blob_is_not_found(content):
    error = await rpc_error(drain(content.stub.Read(pb.ReadContentRequest(digest=sha256(b"missing")))))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_read_of_an_invalid_digest_is_invalid_argument(content):
    error = await rpc_error(drain(content.stub.Read(pb.ReadContentRequest(digest="nope"))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- Status, ListStatuses, Abort


async def test_status_of_an_open_ingest(content):
    call = content.stub.Write()
    await call.write(pb.WriteContentRequest(action=STAT, ref="default/1/layer-x", total=10))
    opened = await call.read()
    await call.write(pb.WriteContentRequest(action=WRITE, offset=0, data=b"abcd"))
    await call.read()
    status = (await content.stub.Status(pb.StatusRequest(ref="default/1/layer-x"))).status
    assert (status.ref, status.offset, status.total) == ("default/1/layer-x", 4, 10)
    assert status.started_at == opened.started_at
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_status_of_an_unknown_ref_is_not_found(content):
    error = await rpc_error(content.stub.Status(pb.StatusRequest(ref="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == 'could not get status for ref "nope": not found'


async def test_list_statuses_filters_by_ref(content):
    for ref in ("a", "b"):
        await drain(content.stub.Write(iter([pb.WriteContentRequest(action=STAT, ref=ref)])))
    everything = await content.stub.ListStatuses(pb.ListStatusesRequest())
    assert sorted(s.ref for s in everything.statuses) == ["a", "b"]
    only_b = await content.stub.ListStatuses(pb.ListStatusesRequest(filters=["ref==b"]))
    assert [s.ref for s in only_b.statuses] == ["b"]


async def test_abort_of_a_missing_ref_succeeds(content):
    await content.stub.Abort(pb.AbortRequest(ref="never opened"))


async def test_a_ref_with_a_dotdot_segment_is_invalid_argument(content):
    error = await rpc_error(drain(content.stub.Write(iter([pb.WriteContentRequest(action=STAT, ref="a/../b")]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await rpc_error(content.stub.Abort(pb.AbortRequest(ref="../x")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- Write


async def test_a_write_stream_writes_and_commits_a_blob(content):
    data = os.urandom(100_000)
    call = content.stub.Write()
    await call.write(pb.WriteContentRequest(action=STAT, ref="r", total=len(data), expected=sha256(data)))
    opened = await call.read()
    assert (opened.action, opened.offset, opened.total) == (STAT, 0, len(data))
    assert opened.digest == sha256(b"")
    assert opened.HasField("started_at") and opened.HasField("updated_at")
    await call.write(pb.WriteContentRequest(action=WRITE, offset=0, data=data[:60_000]))
    assert (await call.read()).offset == 60_000
    await call.write(pb.WriteContentRequest(action=COMMIT, offset=60_000, data=data[60_000:], total=len(data),
                                            expected=sha256(data), labels={"k": "v"}))
    committed = await call.read()
    assert (committed.action, committed.offset, committed.digest) == (COMMIT, len(data), sha256(data))
    assert await call.read() == aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert content.store.info(sha256(data)).labels == {"k": "v"}


async def test_the_first_message_without_a_ref_is_invalid_argument(content):
    error = await rpc_error(drain(content.stub.Write(iter([pb.WriteContentRequest(action=STAT, total=3)]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "first message must have a reference: invalid argument"


async def test_an_unknown_write_action_is_invalid_argument(content):
    error = await rpc_error(drain(content.stub.Write(iter([pb.WriteContentRequest(action=7, ref="r")]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown write action 7" in error.details()


async def test_an_unknown_write_action_mid_stream_is_invalid_argument_and_keeps_the_ingest(content):
    error = await rpc_error(drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=WRITE, ref="r", data=b"abc"),
        pb.WriteContentRequest(action=3),
    ]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert content.store.status("r").offset == 3


async def test_a_write_at_the_wrong_offset_is_out_of_range(content):
    error = await rpc_error(drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=WRITE, ref="r", data=b"abc"),
        pb.WriteContentRequest(action=WRITE, offset=5, data=b"def"),
    ]))))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error.details() == "write @5 must occur at current offset 3: out of range"


async def test_a_commit_with_the_wrong_digest_is_failed_precondition_and_keeps_the_ingest(content):
    error = await rpc_error(drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=COMMIT, ref="r", data=b"abc", expected=sha256(b"xyz")),
    ]))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = (await content.stub.Status(pb.StatusRequest(ref="r"))).status
    assert status.offset == 3
    resumed = await drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=STAT, ref="r"),
        pb.WriteContentRequest(action=COMMIT, offset=3, expected=sha256(b"abc")),
    ])))
    assert [r.offset for r in resumed] == [3, 3]
    assert resumed[-1].digest == sha256(b"abc")


async def test_a_commit_of_an_existing_blob_is_already_exists(content):
    await content.write_blob(b"abc", ref="first")
    error = await rpc_error(drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=COMMIT, ref="second", data=b"abc"),
    ]))))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert not (await content.stub.ListStatuses(pb.ListStatusesRequest())).statuses


async def test_opening_with_an_expected_digest_already_present_is_already_exists(content):
    digest = await content.write_blob(b"abc")
    error = await rpc_error(drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=STAT, ref="r", expected=digest),
    ]))))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_stream_resumes_an_ingest_left_by_an_earlier_stream(content):
    data = os.urandom(256)
    first = await drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=STAT, ref="r", total=256),
        pb.WriteContentRequest(action=WRITE, offset=0, data=data[:128]),
    ])))
    assert first[-1].offset == 128
    call = content.stub.Write()
    await call.write(pb.WriteContentRequest(action=STAT, ref="r", total=256))
    resumed = await call.read()
    assert (resumed.offset, resumed.digest) == (128, sha256(data[:128]))
    assert resumed.started_at == first[0].started_at
    await call.write(pb.WriteContentRequest(action=COMMIT, offset=128, data=data[128:], expected=sha256(data)))
    assert (await call.read()).digest == sha256(data)


async def test_messages_of_8_mib_and_more_are_accepted(content):
    data = os.urandom(8 * MiB + 4096)
    tail = os.urandom(12 * MiB)
    responses = await drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=WRITE, ref="big", total=len(data) + len(tail), data=data),
        pb.WriteContentRequest(action=COMMIT, offset=len(data), data=tail),
    ])))
    assert responses[-1].digest == sha256(data + tail)
    assert (await content.stub.Info(pb.InfoRequest(digest=sha256(data + tail)))).info.size == len(data) + len(tail)


async def test_messages_over_16_mib_are_refused(content):
    error = await rpc_error(drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=WRITE, ref="huge", data=bytes(MAX_MESSAGE_BYTES + 1)),
    ]))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------- one writer per ref


def count_lock_attempts(store: ContentStore, ref: str) -> list[float]:
    attempts: list[float] = []
    acquire = store.locks.acquire

    def counting(requested: str) -> None:
        if requested == ref:
            attempts.append(time.monotonic())
        acquire(requested)

    store.locks.acquire = counting  # type: ignore[method-assign]
    return attempts


async def test_a_second_write_stream_on_a_held_ref_is_retried_then_unavailable(serve):
    content = await serve(lock_wait_ms=200)
    holder = content.stub.Write()
    await holder.write(pb.WriteContentRequest(action=STAT, ref="r"))
    await holder.read()
    attempts = count_lock_attempts(content.store, "r")
    started = time.monotonic()
    error = await rpc_error(drain(content.stub.Write(iter([pb.WriteContentRequest(action=STAT, ref="r")]))))
    waited = time.monotonic() - started
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith("ref r locked for ")
    assert len(attempts) > 2
    assert 0.05 <= waited < 2
    await holder.done_writing()
    assert await holder.code() == grpc.StatusCode.OK


async def test_a_write_stream_reopened_right_after_the_previous_one_half_closed_succeeds(content):
    release = content.store.locks.release

    def slow_release(ref: str) -> None:  # widen the race: the old stream lets go late
        time.sleep(0.2)
        release(ref)

    content.store.locks.release = slow_release  # type: ignore[method-assign]
    attempts = count_lock_attempts(content.store, "r")
    first = content.stub.Write()
    await first.write(pb.WriteContentRequest(action=STAT, ref="r"))
    await first.read()
    await first.write(pb.WriteContentRequest(action=WRITE, offset=0, data=b"abc"))
    await first.read()
    await first.done_writing()
    second = content.stub.Write()
    await second.write(pb.WriteContentRequest(action=STAT, ref="r"))
    reopened = await second.read()
    assert reopened.offset == 3
    assert len(attempts) > 2
    await second.done_writing()
    assert await first.code() == grpc.StatusCode.OK
    assert await second.code() == grpc.StatusCode.OK


async def test_reopening_a_ref_after_each_half_close_always_succeeds(content):
    for i in range(20):
        call = content.stub.Write()
        await call.write(pb.WriteContentRequest(action=STAT, ref="r"))
        assert (await call.read()).offset == i
        await call.write(pb.WriteContentRequest(action=WRITE, offset=i, data=b"x"))
        await call.read()
        await call.done_writing()
    assert content.store.status("r").offset == 20


async def reopen(content: Content, ref: str) -> pb.WriteContentResponse:
    responses = await asyncio.wait_for(drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=STAT, ref=ref),
    ]))), timeout=10)
    return responses[0]


async def test_a_cancelled_write_stream_releases_its_ref(content):
    for i in range(10):
        call = content.stub.Write()
        await call.write(pb.WriteContentRequest(action=WRITE, ref=f"r{i}", data=b"abc"))
        await call.read()
        call.cancel()
        assert (await reopen(content, f"r{i}")).offset == 3


async def test_a_cancelled_write_stream_releases_its_ref_even_when_the_pool_is_busy(content):
    call = content.stub.Write()
    await call.write(pb.WriteContentRequest(action=WRITE, ref="r", data=b"abc"))
    await call.read()
    for _ in range(8):  # every worker of the fixture's pool: the close has to queue
        content.servicer._executor.submit(time.sleep, 0.3)
    call.cancel()
    assert (await reopen(content, "r")).offset == 3


async def test_a_write_stream_cancelled_while_opening_does_not_keep_the_ref(content, monkeypatch):
    open_writer = content.store.open_writer

    def slow_open_writer(*args):
        time.sleep(0.3)
        return open_writer(*args)

    monkeypatch.setattr(content.store, "open_writer", slow_open_writer)
    call = content.stub.Write()
    await call.write(pb.WriteContentRequest(action=STAT, ref="r"))
    await asyncio.sleep(0.1)
    call.cancel()
    assert (await reopen(content, "r")).offset == 0


async def test_a_write_in_progress_when_the_stream_is_cancelled_completes_before_the_ingest_is_closed(
        content, monkeypatch):
    from content.ingest import Writer

    write = Writer.write

    def slow_write(self, data, at):
        time.sleep(0.3)
        return write(self, data, at)

    monkeypatch.setattr(Writer, "write", slow_write)
    call = content.stub.Write()
    await call.write(pb.WriteContentRequest(action=WRITE, ref="r", data=b"abc"))
    await asyncio.sleep(0.1)
    call.cancel()
    assert (await reopen(content, "r")).offset == 3


# --------------------------------------------------------------------------- namespace metadata


async def test_requests_without_containerd_namespace_metadata_are_served(content):
    digest = await content.write_blob(b"abc")
    assert (await content.stub.Info(pb.InfoRequest(digest=digest))).info.size == 3


async def test_requests_with_containerd_namespace_metadata_are_served_the_same(content):
    metadata = (("containerd-namespace", "default"),)
    responses = await drain(content.stub.Write(iter([
        pb.WriteContentRequest(action=COMMIT, ref="r", data=b"abc"),
    ]), metadata=metadata))
    info = (await content.stub.Info(pb.InfoRequest(digest=responses[-1].digest), metadata=metadata)).info
    assert info.size == 3
    other = (("containerd-namespace", "other"),)
    assert (await content.stub.Info(pb.InfoRequest(digest=info.digest), metadata=other)).info.size == 3
