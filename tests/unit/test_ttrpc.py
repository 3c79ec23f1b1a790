"""The sans-I/O ttRPC framing and sessions (nri_bridge.ttrpc)."""
from __future__ import annotations

import struct

import pytest

from nri_bridge import mux
from nri_bridge.ttrpc import (
    MESSAGE_LENGTH_MAX,
    CallResult,
    ClientSession,
    Code,
    Ignored,
    IncomingRequest,
    Message,
    MessageDecoder,
    MessageType,
    Oversized,
    OversizedMessage,
    RejectedRequest,
    ServerSession,
    TtrpcError,
    encode_message,
)
from pysnap._pb.nri import api_pb2
from pysnap._pb.ttrpc import request_pb2

RUNTIME = "nri.pkg.api.v1alpha1.Runtime"
PLUGIN = "nri.pkg.api.v1alpha1.Plugin"


def decode_one(data: bytes) -> Message | Oversized:
    (event,) = MessageDecoder().feed(data)
    return event


def request_message(stream_id: int, service: str = PLUGIN, method: str = "Configure",
                    payload: bytes = b"", type: int = MessageType.REQUEST) -> Message:
    body = request_pb2.Request(service=service, method=method, payload=payload).SerializeToString()
    return Message(stream_id, type, 0, body)


def response_message(stream_id: int, **fields) -> Message:
    return Message(stream_id, MessageType.RESPONSE, 0,
                   request_pb2.Response(**fields).SerializeToString())


def status_of(data: bytes) -> tuple[int, int, str]:
    message = decode_one(data)
    response = request_pb2.Response.FromString(message.payload)
    return message.stream_id, response.status.code, response.status.message


# -- the reference example -------------------------------------------------------------------


def test_register_plugin_example_matches_reference_bytes():
    expected = bytes.fromhex(
        "00000002" "00000041"                   # mux: conn 2, 65 bytes
        "00000037" "00000001" "01" "00"         # ttrpc: 55 bytes, stream 1, REQUEST, no flags
        "0a1c" + b"nri.pkg.api.v1alpha1.Runtime".hex()
        + "120e" + b"RegisterPlugin".hex()
        + "1a07" "0a0178" "12023130"
    )
    payload = api_pb2.RegisterPluginRequest(plugin_name="x", plugin_idx="10").SerializeToString()
    stream_id, message = ClientSession().start_call(RUNTIME, "RegisterPlugin", payload)
    assert stream_id == 1
    assert mux.encode(mux.RUNTIME_CONN, message) == expected
    assert len(expected) == 73


# -- framing ---------------------------------------------------------------------------------


def test_encode_message_writes_the_10_byte_header():
    assert encode_message(5, MessageType.RESPONSE, b"abc", flags=4) == (
        struct.pack(">IIBB", 3, 5, 2, 4) + b"abc"
    )


def test_encode_message_refuses_payload_over_4_mib():
    with pytest.raises(OversizedMessage):
        encode_message(1, MessageType.REQUEST, b"\0" * (MESSAGE_LENGTH_MAX + 1))


def test_decoder_reports_header_fields_and_payload():
    data = struct.pack(">IIBB", 3, 7, 1, 2) + b"xyz"
    assert decode_one(data) == Message(stream_id=7, type=1, flags=2, payload=b"xyz")


def test_decoder_accepts_zero_length_message():
    assert decode_one(struct.pack(">IIBB", 0, 1, 2, 0)) == Message(1, 2, 0, b"")


def test_decoder_waits_for_the_rest_of_a_fragmented_message():
    decoder = MessageDecoder()
    data = encode_message(1, MessageType.REQUEST, b"p" * 100)
    assert decoder.feed(data[:9]) == []
    assert decoder.feed(data[9:50]) == []
    assert decoder.feed(data[50:]) == [Message(1, 1, 0, b"p" * 100)]
    assert decoder.buffered == 0


def test_decoder_skips_oversized_message_then_reports_it():
    decoder = MessageDecoder(max_length=8)
    data = struct.pack(">IIBB", 20, 3, 1, 0) + b"z" * 20 + encode_message(5, 1, b"ok")
    assert decoder.feed(data[:15]) == []
    assert decoder.buffered == 0  # the oversized payload is never buffered
    assert decoder.feed(data[15:]) == [Oversized(3, 1, 0, 20), Message(5, 1, 0, b"ok")]


def test_decoder_passes_unknown_message_types_through():
    assert decode_one(struct.pack(">IIBB", 0, 1, 9, 0)).type == 9


# -- client session --------------------------------------------------------------------------


def test_client_stream_ids_are_odd_and_increasing():
    client = ClientSession()
    ids = [client.start_call(RUNTIME, "RegisterPlugin", b"")[0] for _ in range(4)]
    assert ids == [1, 3, 5, 7]


def test_client_request_carries_timeout_and_metadata():
    _, data = ClientSession().start_call(
        PLUGIN, "Configure", b"pl", timeout_ns=2_000_000_000, metadata={"k": "v"}
    )
    request = request_pb2.Request.FromString(decode_one(data).payload)
    assert (request.service, request.method, request.payload) == (PLUGIN, "Configure", b"pl")
    assert request.timeout_nano == 2_000_000_000
    assert [(kv.key, kv.value) for kv in request.metadata] == [("k", "v")]


def test_client_response_without_status_is_ok():
    client = ClientSession()
    sid, _ = client.start_call(RUNTIME, "RegisterPlugin", b"")
    assert client.receive(Message(sid, MessageType.RESPONSE, 0, b"")) == CallResult(sid, 0, "", b"")
    assert client.pending == frozenset()


def test_client_status_with_code_zero_is_ok():
    client = ClientSession()
    sid, _ = client.start_call(RUNTIME, "RegisterPlugin", b"")
    result = client.receive(response_message(sid, status=request_pb2.Status(code=0), payload=b"p"))
    assert result.ok and result.payload == b"p"


def test_client_error_status_is_reported():
    client = ClientSession()
    sid, _ = client.start_call(PLUGIN, "Nope", b"")
    result = client.receive(
        response_message(sid, status=request_pb2.Status(code=12, message="method Nope"))
    )
    assert (result.status_code, result.status_message) == (12, "method Nope")
    with pytest.raises(TtrpcError) as info:
        result.raise_for_status()
    assert info.value.code == Code.UNIMPLEMENTED


def test_client_reply_for_unknown_stream_is_ignored():
    assert isinstance(ClientSession().receive(response_message(9)), Ignored)


def test_client_second_reply_for_a_finished_stream_is_ignored():
    client = ClientSession()
    sid, _ = client.start_call(RUNTIME, "RegisterPlugin", b"")
    client.receive(response_message(sid))
    assert isinstance(client.receive(response_message(sid)), Ignored)


def test_client_late_reply_after_cancel_is_ignored():
    client = ClientSession()
    sid, _ = client.start_call(RUNTIME, "RegisterPlugin", b"")
    assert client.cancel(sid) is True
    assert isinstance(client.receive(response_message(sid)), Ignored)
    assert client.cancel(sid) is False


def test_client_oversized_reply_fails_the_call_with_resource_exhausted():
    client = ClientSession()
    sid, _ = client.start_call(RUNTIME, "RegisterPlugin", b"")
    result = client.receive(Oversized(sid, MessageType.RESPONSE, 0, MESSAGE_LENGTH_MAX + 1))
    assert result.status_code == Code.RESOURCE_EXHAUSTED


def test_client_undecodable_reply_fails_the_call_with_internal():
    client = ClientSession()
    sid, _ = client.start_call(RUNTIME, "RegisterPlugin", b"")
    result = client.receive(Message(sid, MessageType.RESPONSE, 0, b"\x0a\x05ab"))
    assert result.status_code == Code.INTERNAL


def test_client_ignores_a_request_on_its_stream():
    client = ClientSession()
    sid, _ = client.start_call(RUNTIME, "RegisterPlugin", b"")
    assert isinstance(client.receive(request_message(sid)), Ignored)
    assert client.pending == {sid}


def test_client_tolerates_unknown_response_fields():
    client = ClientSession()
    sid, _ = client.start_call(RUNTIME, "RegisterPlugin", b"")
    body = request_pb2.Response(payload=b"p").SerializeToString() + b"\xf8\x06\x01"
    assert client.receive(Message(sid, MessageType.RESPONSE, 0, body)).payload == b"p"


# -- server session --------------------------------------------------------------------------


def test_server_decodes_a_request():
    body = request_pb2.Request(
        service=PLUGIN, method="CreateContainer", payload=b"pl", timeout_nano=1999916324,
        metadata=[request_pb2.KeyValue(key="containerd-namespace-ttrpc", value="k8s.io")],
    ).SerializeToString()
    assert ServerSession().receive(Message(1, MessageType.REQUEST, 0, body)) == IncomingRequest(
        1, PLUGIN, "CreateContainer", b"pl", 1999916324,
        (("containerd-namespace-ttrpc", "k8s.io"),),
    )


def test_server_tolerates_unknown_request_fields():
    body = request_pb2.Request(service=PLUGIN, method="Configure").SerializeToString()
    result = ServerSession().receive(Message(1, 1, 0, body + b"\xf8\x06\x01\x9a\x07\x01z"))
    assert isinstance(result, IncomingRequest) and result.method == "Configure"


def test_server_rejects_even_stream_id():
    result = ServerSession().receive(request_message(2))
    assert isinstance(result, RejectedRequest)
    assert status_of(result.data) == (
        2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
    )


def test_server_rejects_reused_stream_id():
    server = ServerSession()
    server.receive(request_message(5))
    result = server.receive(request_message(3))
    assert status_of(result.data) == (
        3, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
    )


def test_server_accepts_stream_ids_with_gaps():
    server = ServerSession()
    assert [type(server.receive(request_message(s))) for s in (1, 7, 9)] == [IncomingRequest] * 3


def test_server_rejects_undecodable_request_with_invalid_argument():
    result = ServerSession().receive(Message(1, MessageType.REQUEST, 0, b"\x0a\x05ab"))
    sid, code, message = status_of(result.data)
    assert (sid, code) == (1, Code.INVALID_ARGUMENT)
    assert message.startswith("unmarshal request error")


def test_server_answers_oversized_request_with_resource_exhausted():
    result = ServerSession().receive(Oversized(1, MessageType.REQUEST, 0, MESSAGE_LENGTH_MAX + 1))
    assert status_of(result.data)[:2] == (1, Code.RESOURCE_EXHAUSTED)


def test_server_ignores_a_response_message():
    assert isinstance(ServerSession().receive(response_message(1)), Ignored)


def test_server_rejects_data_message_as_no_streams_exist():
    result = ServerSession().receive(Message(1, MessageType.DATA, 0, b""))
    assert status_of(result.data)[1] == Code.INVALID_ARGUMENT


def test_server_success_reply_has_no_status():
    server = ServerSession()
    server.receive(request_message(1))
    message = decode_one(server.respond(1, b"reply"))
    assert (message.stream_id, message.type, message.flags) == (1, MessageType.RESPONSE, 0)
    response = request_pb2.Response.FromString(message.payload)
    assert not response.HasField("status") and response.payload == b"reply"


def test_server_empty_reply_is_a_bare_header():
    server = ServerSession()
    server.receive(request_message(1))
    assert server.respond(1, b"") == struct.pack(">IIBB", 0, 1, 2, 0)


def test_server_error_reply_carries_code_and_message():
    server = ServerSession()
    server.receive(request_message(3))
    assert status_of(server.respond_error(3, Code.UNKNOWN, "bad index")) == (3, 2, "bad index")


def test_server_reply_over_4_mib_raises_and_leaves_the_request_open():
    server = ServerSession()
    server.receive(request_message(1))
    with pytest.raises(OversizedMessage, match="exceeds"):
        server.respond(1, b"\0" * MESSAGE_LENGTH_MAX)
    assert status_of(server.respond_error(1, Code.RESOURCE_EXHAUSTED, "too big"))[1] == 8


def test_server_cannot_answer_a_stream_twice():
    server = ServerSession()
    server.receive(request_message(1))
    server.respond(1, b"")
    with pytest.raises(ValueError, match="no request waiting"):
        server.respond(1, b"")


def test_ttrpc_error_names_its_code():
    assert str(TtrpcError(12, "method Nope")) == "ttrpc status UNIMPLEMENTED: method Nope"
