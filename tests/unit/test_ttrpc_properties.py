"""Property tests of the sans-I/O multiplexer and ttRPC layers."""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nri_bridge import mux
from nri_bridge.mux import Demultiplexer, ProtocolError
from nri_bridge.ttrpc import (
    CallResult,
    ClientSession,
    Code,
    IncomingRequest,
    Message,
    MessageDecoder,
    RejectedRequest,
    ServerSession,
    encode_message,
)
from pysnap._pb.ttrpc import request_pb2

SETTINGS = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

payloads = st.binary(max_size=300)
messages = st.builds(
    Message,
    stream_id=st.integers(0, 2**32 - 1),
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    payload=payloads,
)


def fragment(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split *data* at the given positions (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


cut_points = st.lists(st.integers(0, 10**6), max_size=40)


def raw_frame(conn_id: int, payload: bytes) -> bytes:
    return struct.pack(">II", conn_id, len(payload)) + payload


@SETTINGS
@given(frames=st.lists(st.tuples(st.integers(1, 2**32 - 1), st.binary(min_size=1, max_size=200)),
                       max_size=30),
       cuts=cut_points)
def test_any_fragmentation_of_frames_decodes_to_the_same_frames(frames, cuts):
    data = b"".join(raw_frame(c, p) for c, p in frames)
    demux = Demultiplexer()
    got = [f for chunk in fragment(data, cuts) for f in demux.feed(chunk)]
    assert got == frames
    assert demux.buffered == 0


@SETTINGS
@given(msgs=st.lists(messages, max_size=30), cuts=cut_points)
def test_any_fragmentation_of_messages_decodes_to_the_same_messages(msgs, cuts):
    data = b"".join(encode_message(m.stream_id, m.type, m.payload, m.flags) for m in msgs)
    decoder = MessageDecoder()
    got = [m for chunk in fragment(data, cuts) for m in decoder.feed(chunk)]
    assert got == msgs


@SETTINGS
@given(
    conn1=st.lists(messages, max_size=15),
    conn2=st.lists(messages, max_size=15),
    frame_sizes=st.lists(st.integers(1, 700), min_size=1, max_size=20),
    order=st.lists(st.booleans(), max_size=200),
    cuts=cut_points,
)
def test_interleaved_frames_of_two_conns_decode_per_conn(conn1, conn2, frame_sizes, order, cuts):
    # Each conn's byte stream is cut into frames that ignore message boundaries,
    # then the two frame sequences are interleaved (keeping each conn's order).
    def frames_of(conn_id, msgs):
        stream = b"".join(encode_message(m.stream_id, m.type, m.payload, m.flags) for m in msgs)
        out, pos, i = [], 0, 0
        while pos < len(stream):
            size = frame_sizes[i % len(frame_sizes)]
            out.append(raw_frame(conn_id, stream[pos:pos + size]))
            pos, i = pos + size, i + 1
        return out

    pending = {1: frames_of(1, conn1), 2: frames_of(2, conn2)}
    wire = []
    choices = iter(order)
    while pending[1] or pending[2]:
        conn_id = 1 if next(choices, True) else 2
        if not pending[conn_id]:
            conn_id = 3 - conn_id
        wire.append(pending[conn_id].pop(0))

    demux = Demultiplexer()
    decoders = {1: MessageDecoder(), 2: MessageDecoder()}
    got = {1: [], 2: []}
    for chunk in fragment(b"".join(wire), cuts):
        for conn_id, payload in demux.feed(chunk):
            got[conn_id].extend(decoders[conn_id].feed(payload))
    assert got == {1: conn1, 2: conn2}


@SETTINGS
@given(conn_id=st.integers(1, 2), size=st.integers(1, 9000), cuts=cut_points)
def test_mux_encode_round_trips_whole_messages(conn_id, size, cuts):
    message = bytes(i % 253 for i in range(size))
    demux = Demultiplexer()
    frames = [f for chunk in fragment(mux.encode(conn_id, message), cuts) for f in demux.feed(chunk)]
    assert b"".join(p for _, p in frames) == message
    assert {c for c, _ in frames} == {conn_id}
    assert len(frames) == (1 if size <= 4096 else 2)


garbage_frames = st.lists(
    st.one_of(
        st.binary(max_size=64),  # anything at all
        st.builds(raw_frame, st.integers(1, 2), st.binary(max_size=64)),  # valid frame, junk inside
    ),
    max_size=20,
)


@SETTINGS
@given(parts=garbage_frames, cuts=cut_points)
def test_garbage_raises_nothing_but_protocol_error(parts, cuts):
    demux = Demultiplexer()
    decoders = {1: MessageDecoder(), 2: MessageDecoder()}
    server, client = ServerSession(), ClientSession()
    for _ in range(3):
        client.start_call("svc", "m", b"")
    try:
        for chunk in fragment(b"".join(parts), cuts):
            for conn_id, payload in demux.feed(chunk):
                decoder = decoders.get(conn_id)
                if decoder is None:
                    continue
                for message in decoder.feed(payload):
                    if conn_id == 1:
                        server.receive(message)
                    else:
                        client.receive(message)
    except ProtocolError:
        pass


text = st.text(max_size=40)


@SETTINGS
@given(
    calls=st.lists(
        st.tuples(text, text, st.binary(max_size=200), st.integers(0, 2**63 - 1),
                  st.lists(st.tuples(text, text), max_size=3)),
        min_size=1, max_size=8,
    ),
    reply=st.binary(max_size=200),
)
def test_request_and_reply_round_trip_through_both_sessions(calls, reply):
    client, server = ClientSession(), ServerSession()
    to_server, to_client = MessageDecoder(), MessageDecoder()
    for service, method, payload, timeout_ns, metadata in calls:
        sid, data = client.start_call(service, method, payload, timeout_ns, metadata)
        (message,) = to_server.feed(data)
        request = server.receive(message)
        assert request == IncomingRequest(sid, service, method, payload, timeout_ns, tuple(metadata))
        (answer,) = to_client.feed(server.respond(sid, reply))
        assert client.receive(answer) == CallResult(sid, Code.OK, "", reply)
    assert client.pending == frozenset() and server.active == frozenset()


@SETTINGS
@given(code=st.integers(1, 16), message=text)
def test_error_status_round_trips(code, message):
    client, server = ClientSession(), ServerSession()
    sid, data = client.start_call("s", "m", b"")
    server.receive(MessageDecoder().feed(data)[0])
    (answer,) = MessageDecoder().feed(server.respond_error(sid, code, message))
    assert client.receive(answer) == CallResult(sid, code, message, b"")


@SETTINGS
@given(n=st.integers(1, 50))
def test_client_stream_ids_are_consecutive_odd_numbers(n):
    client = ClientSession()
    assert [client.start_call("s", "m", b"")[0] for _ in range(n)] == list(range(1, 2 * n, 2))


@SETTINGS
@given(stream_ids=st.lists(st.integers(0, 60), max_size=30))
def test_server_accepts_exactly_odd_strictly_increasing_stream_ids(stream_ids):
    server = ServerSession()
    body = request_pb2.Request(service="s", method="m").SerializeToString()
    last = 0
    for sid in stream_ids:
        result = server.receive(Message(sid, 1, 0, body))
        if sid % 2 == 0:
            assert isinstance(result, RejectedRequest) and "must be odd" in result.message
        elif sid <= last:
            assert isinstance(result, RejectedRequest) and "re-used" in result.message
        else:
            assert isinstance(result, IncomingRequest)
            last = sid
        if isinstance(result, RejectedRequest):
            assert result.stream_id == sid and result.code == Code.INVALID_ARGUMENT
