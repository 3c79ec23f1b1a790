"""Sans-I/O ttRPC: message framing plus client and server session state.

ttRPC (containerd's lightweight gRPC) sends messages with a 10-byte header::

    u32 BE length | u32 BE stream_id | u8 type | u8 flags | length payload bytes

``type`` is 1 (REQUEST, payload = ``ttrpc.Request``), 2 (RESPONSE, payload =
``ttrpc.Response``) or 3 (DATA, streaming only; NRI never uses it).  NRI only
makes unary calls: a client sends a REQUEST on a new odd stream id and the
server answers with exactly one RESPONSE on the same id.

Nothing here touches sockets or event loops.  :class:`MessageDecoder` turns
the bytes of one logical connection into :class:`Message` (or
:class:`Oversized`) events; :class:`ClientSession` and :class:`ServerSession`
turn those events into call results / incoming requests and produce the bytes
to send.  :mod:`nri_bridge.transport` drives them over asyncio.
"""
from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from nri_bridge.mux import ProtocolError
from pysnap._pb.ttrpc import request_pb2

__all__ = [
    "FLAG_NO_DATA",
    "FLAG_REMOTE_CLOSED",
    "FLAG_REMOTE_OPEN",
    "HEADER_LENGTH",
    "MESSAGE_LENGTH_MAX",
    "CallResult",
    "ClientSession",
    "Code",
    "Ignored",
    "IncomingRequest",
    "Message",
    "MessageDecoder",
    "MessageType",
    "Oversized",
    "OversizedMessage",
    "ProtocolError",
    "RejectedRequest",
    "ServerSession",
    "TtrpcError",
    "encode_message",
]

#: Size of the ttRPC message header.
HEADER_LENGTH = 10
#: Largest payload a ttRPC peer accepts (``messageLengthMax`` in Go).
MESSAGE_LENGTH_MAX = 4 << 20

FLAG_REMOTE_CLOSED = 0x01
FLAG_REMOTE_OPEN = 0x02
FLAG_NO_DATA = 0x04

_HEADER = struct.Struct(">IIBB")
_MAX_STREAM_ID = 0xFFFF_FFFF
_INT64_MAX = (1 << 63) - 1
#: Status messages are cut to this many characters so an error reply can never
#: approach the message size limit.
_STATUS_MESSAGE_MAX = 16 * 1024


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code) as used in ``Response.status``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A ttRPC call failed with a non-OK status.

    Raised by a client for an error reply; raised by a server-side handler to
    reply with that status.
    """

    def __init__(self, code: int, message: str = "") -> None:
        self.code = int(code)
        self.message = message
        super().__init__(code, message)

    def __str__(self) -> str:
        try:
            name = Code(self.code).name
        except ValueError:
            name = str(self.code)
        return f"ttrpc status {name}: {self.message}" if self.message else f"ttrpc status {name}"


class OversizedMessage(ValueError):
    """A message to be sent is larger than :data:`MESSAGE_LENGTH_MAX`."""

    def __init__(self, length: int) -> None:
        self.length = length
        super().__init__(
            f"ttRPC message payload of {length} bytes exceeds the maximum of {MESSAGE_LENGTH_MAX}"
        )


# --------------------------------------------------------------------------------------------
# Framing


@dataclass(frozen=True)
class Message:
    """One complete ttRPC message of a logical connection."""

    stream_id: int
    type: int
    flags: int
    payload: bytes


@dataclass(frozen=True)
class Oversized:
    """A message whose header announced more than :data:`MESSAGE_LENGTH_MAX` bytes.

    Its payload was skipped; the stream stays usable.  A server should answer
    ``stream_id`` with RESOURCE_EXHAUSTED, as the Go server does.
    """

    stream_id: int
    type: int
    flags: int
    length: int


def encode_message(stream_id: int, type: int, payload: bytes, flags: int = 0) -> bytes:
    """Return header + *payload*; raises :class:`OversizedMessage` above the limit."""
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream id out of range: {stream_id}")
    if not (0 <= type <= 0xFF and 0 <= flags <= 0xFF):
        raise ValueError(f"message type and flags must fit in one byte: {type}, {flags}")
    if len(payload) > MESSAGE_LENGTH_MAX:
        raise OversizedMessage(len(payload))
    return _HEADER.pack(len(payload), stream_id, type, flags) + bytes(payload)


class MessageDecoder:
    """Parse the byte stream of one logical connection into messages.

    Accepts any fragmentation.  Oversized messages are skipped (without being
    buffered) and reported as :class:`Oversized` once all their bytes have
    gone by.  Message types are passed through unchecked, so that the session
    can ignore unknown ones as Go does.
    """

    def __init__(self, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        self._max_length = max_length
        self._buffer = bytearray()
        self._skipping: Oversized | None = None
        self._skip_left = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a message that is not complete yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message | Oversized]:
        """Add received bytes; return every message completed by them, in order."""
        events: list[Message | Oversized] = []
        buf = self._buffer
        buf += data
        pos = 0
        while True:
            if self._skipping is not None:
                take = min(self._skip_left, len(buf) - pos)
                pos += take
                self._skip_left -= take
                if self._skip_left:
                    break
                events.append(self._skipping)
                self._skipping = None
                continue
            if len(buf) - pos < HEADER_LENGTH:
                break
            length, stream_id, mtype, flags = _HEADER.unpack_from(buf, pos)
            if length > self._max_length:
                self._skipping = Oversized(stream_id, mtype, flags, length)
                self._skip_left = length
                pos += HEADER_LENGTH
                continue
            end = pos + HEADER_LENGTH + length
            if len(buf) < end:
                break
            events.append(Message(stream_id, mtype, flags, bytes(buf[pos + HEADER_LENGTH:end])))
            pos = end
        del buf[:pos]
        return events


# --------------------------------------------------------------------------------------------
# Sessions


@dataclass(frozen=True)
class Ignored:
    """A received message that needs no action (it is only worth a debug log)."""

    stream_id: int
    reason: str


@dataclass(frozen=True)
class CallResult:
    """The outcome of a client call.  ``status_code`` 0 means success."""

    stream_id: int
    status_code: int
    status_message: str
    payload: bytes

    @property
    def ok(self) -> bool:
        return self.status_code == Code.OK

    def raise_for_status(self) -> bytes:
        """Return the payload, or raise :class:`TtrpcError` for an error status."""
        if not self.ok:
            raise TtrpcError(self.status_code, self.status_message)
        return self.payload


@dataclass(frozen=True)
class IncomingRequest:
    """A valid request the server must answer with ``respond``/``respond_error``."""

    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_ns: int
    metadata: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True)
class RejectedRequest:
    """Bad input the server answers itself: send ``data`` to the peer as is."""

    stream_id: int
    code: int
    message: str
    data: bytes


Metadata = Mapping[str, str] | Iterable[tuple[str, str]]


def _metadata_pairs(metadata: Metadata) -> list[tuple[str, str]]:
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return [(str(k), str(v)) for k, v in items]


def _status_response(stream_id: int, code: int, message: str) -> bytes:
    if code == Code.OK:
        raise ValueError("an error reply needs a non-zero status code")
    if len(message) > _STATUS_MESSAGE_MAX:
        message = message[:_STATUS_MESSAGE_MAX] + "... (truncated)"
    response = request_pb2.Response(status=request_pb2.Status(code=code, message=message))
    return encode_message(stream_id, MessageType.RESPONSE, response.SerializeToString())


class ClientSession:
    """Client half of a ttRPC session: allocates stream ids and matches replies."""

    def __init__(self) -> None:
        self._next_stream_id = 1
        self._pending: set[int] = set()

    @property
    def pending(self) -> frozenset[int]:
        """Stream ids of calls still waiting for their response."""
        return frozenset(self._pending)

    def start_call(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout_ns: int = 0,
        metadata: Metadata = (),
    ) -> tuple[int, bytes]:
        """Start a unary call; return its stream id and the message to send.

        Stream ids are 1, 3, 5, ... in call order, so the messages must be
        sent in the order this method returned them.
        """
        stream_id = self._next_stream_id
        if stream_id > _MAX_STREAM_ID:
            raise ProtocolError("ttRPC stream ids exhausted on this connection")
        request = request_pb2.Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=max(0, min(int(timeout_ns), _INT64_MAX)),
            metadata=[request_pb2.KeyValue(key=k, value=v) for k, v in _metadata_pairs(metadata)],
        )
        data = encode_message(stream_id, MessageType.REQUEST, request.SerializeToString())
        self._next_stream_id += 2
        self._pending.add(stream_id)
        return stream_id, data

    def cancel(self, stream_id: int) -> bool:
        """Forget a call (e.g. after a timeout) so that a late reply is ignored.

        Returns whether the call was still pending.
        """
        try:
            self._pending.remove(stream_id)
        except KeyError:
            return False
        return True

    def receive(self, message: Message | Oversized) -> CallResult | Ignored:
        """Match a received message to its call."""
        sid = message.stream_id
        if sid not in self._pending:
            return Ignored(sid, "message on an inactive stream")
        if isinstance(message, Oversized):
            self._pending.discard(sid)
            return CallResult(
                sid,
                Code.RESOURCE_EXHAUSTED,
                f"message length {message.length} exceeds maximum message size of {MESSAGE_LENGTH_MAX}",
                b"",
            )
        if message.type != MessageType.RESPONSE:
            return Ignored(sid, f"unexpected message type {message.type} on a client stream")
        self._pending.discard(sid)
        response = request_pb2.Response()
        try:
            response.ParseFromString(message.payload)
        except DecodeError as exc:
            return CallResult(sid, Code.INTERNAL, f"cannot decode ttRPC response: {exc}", b"")
        if response.HasField("status") and response.status.code != Code.OK:
            return CallResult(sid, response.status.code, response.status.message, response.payload)
        return CallResult(sid, Code.OK, "", response.payload)


class ServerSession:
    """Server half of a ttRPC session: validates requests and encodes replies."""

    def __init__(self) -> None:
        self._last_stream_id = 0
        self._active: set[int] = set()

    @property
    def active(self) -> frozenset[int]:
        """Stream ids of accepted requests that have not been answered yet."""
        return frozenset(self._active)

    def receive(self, message: Message | Oversized) -> IncomingRequest | RejectedRequest | Ignored:
        """Classify a received message, following the Go server's checks in order."""
        sid = message.stream_id
        if isinstance(message, Oversized):
            return self._reject(
                sid,
                Code.RESOURCE_EXHAUSTED,
                f"message length {message.length} exceed maximum message size of {MESSAGE_LENGTH_MAX}",
            )
        if sid % 2 != 1:
            return self._reject(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
        if message.type == MessageType.DATA:
            # No streaming methods exist in NRI, so no stream can take data.
            return self._reject(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
        if message.type != MessageType.REQUEST:
            return Ignored(sid, f"unexpected message type {message.type} on a server stream")
        if sid <= self._last_stream_id:
            return self._reject(
                sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
        self._last_stream_id = sid
        request = request_pb2.Request()
        try:
            request.ParseFromString(message.payload)
        except DecodeError as exc:
            return self._reject(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        self._active.add(sid)
        return IncomingRequest(
            stream_id=sid,
            service=request.service,
            method=request.method,
            payload=request.payload,
            timeout_ns=request.timeout_nano,
            metadata=tuple((kv.key, kv.value) for kv in request.metadata),
        )

    def respond(self, stream_id: int, payload: bytes) -> bytes:
        """Encode a successful reply (no status) to an accepted request.

        Raises :class:`OversizedMessage` if it would exceed 4 MiB; the request
        then stays open so that an error can be sent instead.
        """
        self._check_active(stream_id)
        data = encode_message(
            stream_id, MessageType.RESPONSE, request_pb2.Response(payload=payload).SerializeToString()
        )
        self._active.discard(stream_id)
        return data

    def respond_error(self, stream_id: int, code: int, message: str) -> bytes:
        """Encode an error reply ``Response{status{code, message}}``."""
        self._check_active(stream_id)
        data = _status_response(stream_id, code, message)
        self._active.discard(stream_id)
        return data

    def _check_active(self, stream_id: int) -> None:
        if stream_id not in self._active:
            raise ValueError(f"stream {stream_id} has no request waiting for a response")

    @staticmethod
    def _reject(stream_id: int, code: int, message: str) -> RejectedRequest:
        return RejectedRequest(stream_id, code, message, _status_response(stream_id, code, message))
