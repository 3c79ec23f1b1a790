"""The asyncio NRI connection (nri_bridge.transport) over real socket pairs."""
from __future__ import annotations

import asyncio
import logging
import socket
import struct

import pytest

from nri_bridge import mux
from nri_bridge.transport import CallTimeout, ConnectionClosed, NriConnection, TtrpcError
from nri_bridge.ttrpc import MessageDecoder, MessageType, encode_message
from pysnap._pb.nri import api_pb2
from pysnap._pb.ttrpc import request_pb2

RUNTIME = "nri.pkg.api.v1alpha1.Runtime"
PLUGIN = "nri.pkg.api.v1alpha1.Plugin"
WAIT = 5.0  # upper bound for anything that should happen promptly


@pytest.fixture
async def pair():
    """(runtime, plugin): two connected NriConnections, no handlers yet."""
    a, b = socket.socketpair()
    runtime = await NriConnection.from_socket(a, role="runtime", name="runtime")
    plugin = await NriConnection.from_socket(b, role="plugin", name="plugin")
    yield runtime, plugin
    await runtime.close()
    await plugin.close()


@pytest.fixture
async def plugin_and_raw_peer():
    """(plugin connection, raw asyncio streams of the runtime end)."""
    a, b = socket.socketpair()
    plugin = await NriConnection.from_socket(b, name="plugin")
    reader, writer = await asyncio.open_unix_connection(sock=a)
    yield plugin, reader, writer
    await plugin.close()
    writer.close()


def register_request(name: str = "x", idx: str = "10") -> bytes:
    return api_pb2.RegisterPluginRequest(plugin_name=name, plugin_idx=idx).SerializeToString()


async def read_message(reader: asyncio.StreamReader, conn_id: int) -> tuple[object, list[int]]:
    """Read frames until one whole ttRPC message arrives; return it and the frame sizes."""
    decoder, sizes = MessageDecoder(), []
    while True:
        cid, length = struct.unpack(">II", await reader.readexactly(8))
        assert cid == conn_id
        sizes.append(length)
        messages = decoder.feed(await reader.readexactly(length))
        if messages:
            (message,) = messages
            return message, sizes


async def test_plugin_registers_with_the_runtime(pair):
    runtime, plugin = pair
    seen = []

    async def register(payload, metadata):
        seen.append(api_pb2.RegisterPluginRequest.FromString(payload))
        return b""

    runtime.handlers[(RUNTIME, "RegisterPlugin")] = register
    assert await plugin.call(RUNTIME, "RegisterPlugin", register_request(), timeout=WAIT) == b""
    assert [(r.plugin_name, r.plugin_idx) for r in seen] == [("x", "10")]


async def test_configure_is_served_while_register_plugin_is_pending(pair):
    # The runtime sends Configure before it answers RegisterPlugin; the plugin
    # must serve it although its own call is still waiting.
    runtime, plugin = pair

    async def configure(payload, metadata):
        return api_pb2.ConfigureResponse(events=0x8).SerializeToString()

    async def register(payload, metadata):
        reply = await runtime.call(PLUGIN, "Configure", b"", timeout=WAIT)
        assert api_pb2.ConfigureResponse.FromString(reply).events == 0x8
        return b""

    plugin.handlers[(PLUGIN, "Configure")] = configure
    runtime.handlers[(RUNTIME, "RegisterPlugin")] = register
    assert await plugin.call(RUNTIME, "RegisterPlugin", register_request(), timeout=WAIT) == b""


async def test_calls_in_both_directions_at_once(pair):
    runtime, plugin = pair

    async def echo(payload, metadata):
        await asyncio.sleep(0.01)
        return payload

    runtime.handlers[(RUNTIME, "UpdateContainers")] = echo
    plugin.handlers[(PLUGIN, "StateChange")] = echo
    results = await asyncio.gather(
        *(plugin.call(RUNTIME, "UpdateContainers", b"up%d" % i, timeout=WAIT) for i in range(5)),
        *(runtime.call(PLUGIN, "StateChange", b"ev%d" % i, timeout=WAIT) for i in range(5)),
    )
    assert results == [b"up%d" % i for i in range(5)] + [b"ev%d" % i for i in range(5)]


async def test_concurrent_requests_are_answered_out_of_order(pair):
    runtime, plugin = pair
    second_done = asyncio.Event()
    finished = []

    async def create(payload, metadata):
        if payload == b"first":
            await second_done.wait()  # cannot finish unless the second one runs meanwhile
        finished.append(payload)
        if payload == b"second":
            second_done.set()
        return payload

    plugin.handlers[(PLUGIN, "CreateContainer")] = create
    first = asyncio.ensure_future(runtime.call(PLUGIN, "CreateContainer", b"first", timeout=WAIT))
    await asyncio.sleep(0)
    second = await runtime.call(PLUGIN, "CreateContainer", b"second", timeout=WAIT)
    assert (second, await first) == (b"second", b"first")
    assert finished == [b"second", b"first"]


async def test_unknown_method_gets_unimplemented(pair):
    runtime, plugin = pair

    async def configure(payload, metadata):
        return b""

    plugin.handlers[(PLUGIN, "Configure")] = configure
    with pytest.raises(TtrpcError) as info:
        await runtime.call(PLUGIN, "Nope", b"", timeout=WAIT)
    assert (info.value.code, info.value.message) == (12, "method Nope")


async def test_unknown_service_gets_unimplemented(pair):
    runtime, plugin = pair
    with pytest.raises(TtrpcError) as info:
        await runtime.call("no.such.Service", "Configure", b"", timeout=WAIT)
    assert (info.value.code, info.value.message) == (12, "service no.such.Service")


async def test_handler_ttrpc_error_becomes_the_reply_status(pair):
    runtime, plugin = pair

    async def register(payload, metadata):
        raise TtrpcError(3, "invalid plugin index")

    runtime.handlers[(RUNTIME, "RegisterPlugin")] = register
    with pytest.raises(TtrpcError) as info:
        await plugin.call(RUNTIME, "RegisterPlugin", register_request(idx="x"), timeout=WAIT)
    assert (info.value.code, info.value.message) == (3, "invalid plugin index")


async def test_handler_exception_becomes_unknown_and_is_logged(pair, caplog):
    runtime, plugin = pair

    async def create(payload, metadata):
        raise RuntimeError("boom")

    plugin.handlers[(PLUGIN, "CreateContainer")] = create
    with caplog.at_level(logging.ERROR, logger="nri_bridge.transport"):
        with pytest.raises(TtrpcError) as info:
            await runtime.call(PLUGIN, "CreateContainer", b"", timeout=WAIT)
    assert (info.value.code, info.value.message) == (2, "boom")
    assert any("CreateContainer" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_handler_receives_request_metadata(pair):
    runtime, plugin = pair
    seen = []

    async def state_change(payload, metadata):
        seen.append(metadata)
        return b""

    plugin.handlers[(PLUGIN, "StateChange")] = state_change
    await runtime.call(PLUGIN, "StateChange", b"", timeout=WAIT,
                       metadata=[("containerd-namespace-ttrpc", "k8s.io")])
    assert seen == [(("containerd-namespace-ttrpc", "k8s.io"),)]


async def test_large_messages_cross_intact(pair):
    runtime, plugin = pair
    big = bytes(i % 251 for i in range(3 << 20))

    async def synchronize(payload, metadata):
        assert payload == big
        return payload[::-1]

    plugin.handlers[(PLUGIN, "Synchronize")] = synchronize
    assert await runtime.call(PLUGIN, "Synchronize", big, timeout=WAIT) == big[::-1]


async def test_call_timeout_then_late_reply_is_dropped(pair, caplog):
    runtime, plugin = pair
    release = asyncio.Event()
    replied = asyncio.Event()

    async def slow(payload, metadata):
        if payload == b"slow":
            await release.wait()
            replied.set()
        return payload

    runtime.handlers[(RUNTIME, "UpdateContainers")] = slow
    with pytest.raises(CallTimeout) as info:
        await plugin.call(RUNTIME, "UpdateContainers", b"slow", timeout=0.05)
    assert isinstance(info.value, asyncio.TimeoutError)
    assert info.value.stream_id == 1

    with caplog.at_level(logging.DEBUG, logger="nri_bridge.transport"):
        release.set()
        await asyncio.wait_for(replied.wait(), WAIT)
        # The next call gets its own reply, not the late one.
        assert await plugin.call(RUNTIME, "UpdateContainers", b"fast", timeout=WAIT) == b"fast"
    assert any("inactive stream" in r.getMessage() for r in caplog.records)
    assert not plugin.is_closed


async def test_peer_eof_fails_pending_calls(plugin_and_raw_peer):
    plugin, reader, writer = plugin_and_raw_peer
    call = asyncio.ensure_future(plugin.call(RUNTIME, "RegisterPlugin", register_request()))
    await read_message(reader, mux.RUNTIME_CONN)  # the request went out; never answer it
    writer.close()
    with pytest.raises(ConnectionClosed, match="peer closed"):
        await asyncio.wait_for(call, WAIT)
    await asyncio.wait_for(plugin.closed.wait(), WAIT)


async def test_protocol_error_closes_the_connection(plugin_and_raw_peer):
    plugin, reader, writer = plugin_and_raw_peer
    call = asyncio.ensure_future(plugin.call(RUNTIME, "RegisterPlugin", register_request()))
    await read_message(reader, mux.RUNTIME_CONN)
    writer.write(struct.pack(">II", 0, 1) + b"x")  # conn_id 0 is reserved
    with pytest.raises(ConnectionClosed, match="protocol error"):
        await asyncio.wait_for(call, WAIT)
    assert plugin.is_closed
    assert await reader.read() == b""  # our side of the socket was closed too


async def test_close_is_idempotent_and_fails_later_calls(pair):
    runtime, plugin = pair
    await plugin.close()
    await plugin.close()
    assert plugin.closed.is_set()
    with pytest.raises(ConnectionClosed):
        await plugin.call(RUNTIME, "RegisterPlugin", b"", timeout=WAIT)
    await asyncio.wait_for(runtime.closed.wait(), WAIT)  # the peer sees EOF


async def test_local_close_fails_pending_calls(pair):
    runtime, plugin = pair

    async def never(payload, metadata):
        await asyncio.Event().wait()

    runtime.handlers[(RUNTIME, "RegisterPlugin")] = never
    call = asyncio.ensure_future(plugin.call(RUNTIME, "RegisterPlugin", b""))
    await asyncio.sleep(0.01)
    await plugin.close()
    with pytest.raises(ConnectionClosed, match="closed locally"):
        await call


async def test_register_plugin_goes_out_as_the_reference_bytes(plugin_and_raw_peer):
    plugin, reader, writer = plugin_and_raw_peer
    call = asyncio.ensure_future(plugin.call(RUNTIME, "RegisterPlugin", register_request()))
    assert await reader.readexactly(73) == bytes.fromhex(
        "0000000200000041000000370000000101000a1c6e72692e706b672e6170692e7631616c706861312e52"
        "756e74696d65120e5265676973746572506c7567696e1a070a017812023130"
    )
    writer.write(mux.encode(mux.RUNTIME_CONN, encode_message(1, MessageType.RESPONSE, b"")))
    assert await asyncio.wait_for(call, WAIT) == b""


async def test_large_reply_is_written_as_4096_then_the_rest(plugin_and_raw_peer):
    plugin, reader, writer = plugin_and_raw_peer

    async def configure(payload, metadata):
        return b"c" * 10_000

    plugin.handlers[(PLUGIN, "Configure")] = configure
    request = request_pb2.Request(service=PLUGIN, method="Configure").SerializeToString()
    writer.write(mux.encode(mux.PLUGIN_CONN, encode_message(1, MessageType.REQUEST, request)))
    message, sizes = await asyncio.wait_for(read_message(reader, mux.PLUGIN_CONN), WAIT)
    assert sizes == [4096, 10 + len(message.payload) - 4096]
    assert request_pb2.Response.FromString(message.payload).payload == b"c" * 10_000


async def test_even_stream_id_is_answered_with_invalid_argument(plugin_and_raw_peer):
    plugin, reader, writer = plugin_and_raw_peer
    request = request_pb2.Request(service=PLUGIN, method="Configure").SerializeToString()
    writer.write(mux.encode(mux.PLUGIN_CONN, encode_message(2, MessageType.REQUEST, request)))
    message, _ = await asyncio.wait_for(read_message(reader, mux.PLUGIN_CONN), WAIT)
    status = request_pb2.Response.FromString(message.payload).status
    assert (message.stream_id, status.code) == (2, 3)
    assert not plugin.is_closed


async def test_connection_from_an_inherited_fd():
    a, b = socket.socketpair()
    plugin = await NriConnection.from_fd(b.detach())
    runtime = await NriConnection.from_socket(a, role="runtime")

    async def register(payload, metadata):
        return b""

    runtime.handlers[(RUNTIME, "RegisterPlugin")] = register
    async with plugin, runtime:
        assert await plugin.call(RUNTIME, "RegisterPlugin", register_request(), timeout=WAIT) == b""
    assert plugin.is_closed and runtime.is_closed


async def test_connection_to_a_unix_socket_path(tmp_path):
    path = str(tmp_path / "nri.sock")
    accepted: asyncio.Queue[NriConnection] = asyncio.Queue()

    async def register(payload, metadata):
        return b""

    async def on_connect(reader, writer):
        conn = NriConnection(reader, writer, {(RUNTIME, "RegisterPlugin"): register}, role="runtime")
        conn.start()
        await accepted.put(conn)

    server = await asyncio.start_unix_server(on_connect, path)
    async with server:
        plugin = await NriConnection.connect(path)
        try:
            assert await plugin.call(RUNTIME, "RegisterPlugin", register_request(), timeout=WAIT) == b""
        finally:
            await plugin.close()
            await (await accepted.get()).close()


async def test_close_does_not_hang_when_the_peer_reads_nothing(plugin_and_raw_peer):
    plugin, reader, writer = plugin_and_raw_peer
    plugin.close_timeout = 0.1
    call = asyncio.ensure_future(plugin.call(RUNTIME, "UpdateContainers", b"u" * (3 << 20)))
    await asyncio.sleep(0.05)  # the call is now stuck waiting for the socket to drain
    assert not call.done()
    await asyncio.wait_for(plugin.close(), WAIT)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(call, WAIT)


async def test_handler_error_with_invalid_code_becomes_unknown(pair):
    runtime, plugin = pair

    async def configure(payload, metadata):
        raise TtrpcError(0, "not really an error code")

    plugin.handlers[(PLUGIN, "Configure")] = configure
    with pytest.raises(TtrpcError) as info:
        await runtime.call(PLUGIN, "Configure", b"", timeout=WAIT)
    assert (info.value.code, info.value.message) == (2, "not really an error code")


async def test_reply_over_4_mib_becomes_resource_exhausted(pair):
    runtime, plugin = pair

    async def synchronize(payload, metadata):
        return b"\0" * ((4 << 20) + 1)

    plugin.handlers[(PLUGIN, "Synchronize")] = synchronize
    with pytest.raises(TtrpcError) as info:
        await runtime.call(PLUGIN, "Synchronize", b"", timeout=WAIT)
    assert info.value.code == 8


async def test_oversized_request_is_answered_and_the_connection_stays_usable(plugin_and_raw_peer):
    plugin, reader, writer = plugin_and_raw_peer
    header = struct.pack(">IIBB", (4 << 20) + 1, 1, MessageType.REQUEST, 0)
    writer.write(mux.encode(mux.PLUGIN_CONN, header + b"\0" * ((4 << 20) + 1)))
    message, _ = await asyncio.wait_for(read_message(reader, mux.PLUGIN_CONN), WAIT)
    assert (message.stream_id, request_pb2.Response.FromString(message.payload).status.code) == (1, 8)
    request = request_pb2.Request(service=PLUGIN, method="Nope").SerializeToString()
    writer.write(mux.encode(mux.PLUGIN_CONN, encode_message(3, MessageType.REQUEST, request)))
    message, _ = await asyncio.wait_for(read_message(reader, mux.PLUGIN_CONN), WAIT)
    assert request_pb2.Response.FromString(message.payload).status.code == 12
