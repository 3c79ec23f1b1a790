"""Sans-I/O codec for the NRI connection multiplexer.

An NRI plugin talks to the runtime over one stream socket that carries two
logical byte streams, each with its own ttRPC session.  Every chunk of a
logical stream travels in a frame::

    u32 BE conn_id | u32 BE payload length N | N payload bytes

Frames do not line up with ttRPC messages: a message may be split over
several frames, so a reader must concatenate the payloads per ``conn_id``
before parsing ttRPC (see :mod:`nri_bridge.ttrpc`).

This module does no I/O.  :class:`Demultiplexer` turns received bytes into
``(conn_id, payload)`` pairs and :func:`encode` turns one whole ttRPC message
into the bytes to write.
"""
from __future__ import annotations

import struct

__all__ = [
    "FRAME_HEADER_LENGTH",
    "MAX_FRAME_LENGTH",
    "PLUGIN_CONN",
    "ProtocolError",
    "RUNTIME_CONN",
    "WRITE_SPLIT",
    "Demultiplexer",
    "encode",
]

#: Logical connection on which the runtime is the ttRPC client and the plugin
#: serves ``nri.pkg.api.v1alpha1.Plugin``.
PLUGIN_CONN = 1
#: Logical connection on which the plugin is the ttRPC client of
#: ``nri.pkg.api.v1alpha1.Runtime``.
RUNTIME_CONN = 2

#: Size of a frame header: conn_id and payload length, both u32 big-endian.
FRAME_HEADER_LENGTH = 8
#: Largest frame payload the demultiplexer accepts.  The Go writers never send
#: more than 16 MiB (NRI 0.6.1) or 4 MiB + 10 bytes (NRI 0.8.0) in one frame,
#: so anything above this means the stream is corrupt or not NRI at all.
MAX_FRAME_LENGTH = 64 * 1024 * 1024
#: A message longer than this is written as two frames: this many bytes, then
#: the rest.  The runtime reads each logical conn through a 4096-byte buffer
#: and fails with ENOMEM on a larger frame that starts a ttRPC message.
WRITE_SPLIT = 4096

_MAX_CONN_ID = 0xFFFF_FFFF
_HEADER = struct.Struct(">II")


class ProtocolError(Exception):
    """The peer sent bytes that violate the NRI multiplexer or ttRPC framing.

    The connection cannot be resynchronised after this; close it.
    """


class Demultiplexer:
    """Split a received byte stream into ``(conn_id, payload)`` frames.

    Feed it whatever the socket returns, in any fragmentation; it buffers an
    incomplete frame until the rest arrives.  A bad header raises
    :class:`ProtocolError` as soon as its 8 bytes are available, and every
    later :meth:`feed` raises it again: the byte stream is unrecoverable.
    Frames with an empty payload carry nothing and are not reported.
    """

    def __init__(self, max_frame_length: int = MAX_FRAME_LENGTH) -> None:
        if max_frame_length < 1:
            raise ValueError("max_frame_length must be positive")
        self._max_frame_length = max_frame_length
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add received bytes; return every frame completed by them, in order."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        buf = self._buffer
        frames: list[tuple[int, bytes]] = []
        pos = 0
        try:
            while len(buf) - pos >= FRAME_HEADER_LENGTH:
                conn_id, length = _HEADER.unpack_from(buf, pos)
                if conn_id == 0:
                    raise ProtocolError("multiplexer frame for reserved conn_id 0")
                if length > self._max_frame_length:
                    raise ProtocolError(
                        f"multiplexer frame for conn_id {conn_id} announces {length} bytes, "
                        f"more than the limit of {self._max_frame_length}"
                    )
                end = pos + FRAME_HEADER_LENGTH + length
                if len(buf) < end:
                    break
                if length:
                    frames.append((conn_id, bytes(buf[pos + FRAME_HEADER_LENGTH:end])))
                pos = end
        except ProtocolError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise
        finally:
            if pos and self._error is None:
                del buf[:pos]
        return frames


def encode(conn_id: int, message: bytes) -> bytes:
    """Frame one whole ttRPC *message* for *conn_id*, ready to write.

    Uses the layout the Go runtime reads safely: a message of at most
    :data:`WRITE_SPLIT` bytes goes in one frame; a longer one becomes a
    :data:`WRITE_SPLIT`-byte frame followed by one frame with the remainder.
    Never pass two messages at once: the end of one message and the start of
    the next must not share a frame.  An empty message encodes to nothing.
    """
    if not 0 < conn_id <= _MAX_CONN_ID:
        raise ValueError(f"conn_id must be in 1..{_MAX_CONN_ID}, not {conn_id}")
    size = len(message)
    if size - WRITE_SPLIT > MAX_FRAME_LENGTH:
        raise ValueError(f"message of {size} bytes is too large to frame")
    if size == 0:
        return b""
    if size <= WRITE_SPLIT:
        return _HEADER.pack(conn_id, size) + bytes(message)
    view = memoryview(message)
    return b"".join(
        (
            _HEADER.pack(conn_id, WRITE_SPLIT),
            view[:WRITE_SPLIT],
            _HEADER.pack(conn_id, size - WRITE_SPLIT),
            view[WRITE_SPLIT:],
        )
    )
