"""The sans-I/O NRI connection multiplexer (nri_bridge.mux)."""
from __future__ import annotations

import struct

import pytest

from nri_bridge.mux import (
    MAX_FRAME_LENGTH,
    PLUGIN_CONN,
    RUNTIME_CONN,
    WRITE_SPLIT,
    Demultiplexer,
    ProtocolError,
    encode,
)


def frame(conn_id: int, payload: bytes) -> bytes:
    return struct.pack(">II", conn_id, len(payload)) + payload


def split_frames(data: bytes) -> list[tuple[int, int]]:
    """(conn_id, length) of every frame in *data*, parsed independently of the module."""
    out = []
    pos = 0
    while pos < len(data):
        conn_id, length = struct.unpack_from(">II", data, pos)
        out.append((conn_id, length))
        pos += 8 + length
    assert pos == len(data)
    return out


def test_conn_ids_match_nri():
    assert PLUGIN_CONN == 1
    assert RUNTIME_CONN == 2


def test_one_frame_is_decoded():
    assert Demultiplexer().feed(frame(2, b"hello")) == [(2, b"hello")]


def test_frame_fed_byte_by_byte_is_buffered_until_complete():
    demux = Demultiplexer()
    data = frame(1, b"abcdef")
    results = [demux.feed(data[i:i + 1]) for i in range(len(data))]
    assert results[:-1] == [[]] * (len(data) - 1)
    assert results[-1] == [(1, b"abcdef")]
    assert demux.buffered == 0


def test_several_frames_in_one_read_are_all_returned_in_order():
    data = frame(1, b"a") + frame(2, b"bb") + frame(1, b"ccc")
    assert Demultiplexer().feed(data) == [(1, b"a"), (2, b"bb"), (1, b"ccc")]


def test_partial_trailing_frame_is_kept_for_the_next_feed():
    demux = Demultiplexer()
    data = frame(1, b"first") + frame(2, b"second")
    assert demux.feed(data[:20]) == [(1, b"first")]
    assert demux.buffered == 7
    assert demux.feed(data[20:]) == [(2, b"second")]


def test_empty_frame_is_not_reported():
    assert Demultiplexer().feed(frame(1, b"") + frame(2, b"x")) == [(2, b"x")]


def test_unknown_conn_id_is_passed_through_for_the_caller_to_drop():
    assert Demultiplexer().feed(frame(7, b"x")) == [(7, b"x")]


def test_conn_id_zero_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="conn_id 0"):
        Demultiplexer().feed(frame(0, b"x"))


def test_absurd_length_is_a_protocol_error_as_soon_as_the_header_arrives():
    header = struct.pack(">II", 1, MAX_FRAME_LENGTH + 1)
    with pytest.raises(ProtocolError, match="announces"):
        Demultiplexer().feed(header)


def test_frame_of_exactly_the_limit_is_accepted():
    demux = Demultiplexer(max_frame_length=16)
    assert demux.feed(frame(1, b"x" * 16)) == [(1, b"x" * 16)]


def test_protocol_error_is_sticky():
    demux = Demultiplexer()
    with pytest.raises(ProtocolError):
        demux.feed(frame(0, b""))
    with pytest.raises(ProtocolError):
        demux.feed(frame(1, b"fine"))


def test_encode_small_message_is_one_frame():
    assert encode(2, b"msg") == frame(2, b"msg")


def test_encode_message_of_exactly_4096_bytes_is_one_frame():
    message = bytes(range(256)) * 16
    assert split_frames(encode(1, message)) == [(1, 4096)]


def test_encode_message_over_4096_bytes_is_4096_then_the_rest():
    message = bytes(i % 251 for i in range(10096))
    data = encode(1, message)
    assert split_frames(data) == [(1, WRITE_SPLIT), (1, 10096 - WRITE_SPLIT)]
    assert Demultiplexer().feed(data) == [(1, message[:4096]), (1, message[4096:])]


def test_encode_3_mib_message_is_still_two_frames():
    message = b"\xab" * (3 << 20)
    assert split_frames(encode(2, message)) == [(2, 4096), (2, (3 << 20) - 4096)]


def test_encode_empty_message_writes_nothing():
    assert encode(1, b"") == b""


@pytest.mark.parametrize("conn_id", [0, -1, 1 << 32])
def test_encode_rejects_invalid_conn_id(conn_id):
    with pytest.raises(ValueError, match="conn_id"):
        encode(conn_id, b"x")
