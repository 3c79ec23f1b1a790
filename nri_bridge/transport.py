"""asyncio driver for the sans-I/O NRI multiplexer and ttRPC sessions.

One :class:`NriConnection` owns one stream socket (an asyncio reader/writer
pair).  A single read loop splits the socket into the two logical NRI
connections and feeds each to its ttRPC session:

* the *server* conn (1 for a plugin): every request runs its handler in its
  own task, so a slow handler never blocks other requests, our own calls, or
  the reading of replies;
* the *client* conn (2 for a plugin): :meth:`NriConnection.call` sends a
  request and waits for the matching reply.

Because the read loop never waits for a write or a handler, both sides may
call each other at the same time without deadlock (the runtime's Configure
may arrive before the reply to our RegisterPlugin).  Whole messages are
written under a lock, so two messages never interleave on the socket.

The same class can play the runtime side (``role="runtime"``), which the
tests use to exercise a plugin without containerd.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from typing import Literal

from nri_bridge import mux
from nri_bridge.mux import PLUGIN_CONN, RUNTIME_CONN, Demultiplexer, ProtocolError
from nri_bridge.ttrpc import (
    CallResult,
    ClientSession,
    Code,
    Ignored,
    IncomingRequest,
    Message,
    MessageDecoder,
    Metadata,
    Oversized,
    OversizedMessage,
    RejectedRequest,
    ServerSession,
    TtrpcError,
)

__all__ = [
    "CallTimeout",
    "ConnectionClosed",
    "Handler",
    "NriConnection",
    "RequestMetadata",
    "TtrpcError",
]

log = logging.getLogger(__name__)

#: Metadata of an incoming request: the (key, value) pairs in received order.
RequestMetadata = tuple[tuple[str, str], ...]
#: A request handler: ``await handler(payload, metadata)`` returns the
#: serialized response message (``b""`` or ``None`` for an empty one).
Handler = Callable[[bytes, RequestMetadata], Awaitable[bytes | None]]

_READ_SIZE = 256 * 1024


class ConnectionClosed(ConnectionError):
    """The NRI connection is closed (by us, by the peer, or after a protocol error)."""


class CallTimeout(asyncio.TimeoutError):
    """A call got no reply in time.  A reply that arrives later is dropped."""

    def __init__(self, message: str, *, service: str, method: str, stream_id: int) -> None:
        super().__init__(message)
        self.service = service
        self.method = method
        self.stream_id = stream_id


class NriConnection:
    """Both ttRPC sessions of one NRI socket, driven by one read loop.

    ``handlers`` maps ``(service, method)`` to an async handler (see
    :data:`Handler`).  A handler that raises :class:`TtrpcError` replies with
    that status; any other exception replies with UNKNOWN (2) and is logged.
    A request for a method nobody handles gets UNIMPLEMENTED (12).

    Call :meth:`start` (or use ``async with``) to begin reading; :meth:`call`
    starts it too.  :attr:`closed` is set once the connection is closed, for
    whatever reason (:attr:`close_reason`); calls pending at that moment fail
    with :class:`ConnectionClosed`.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handlers: Mapping[tuple[str, str], Handler] | None = None,
        *,
        role: Literal["plugin", "runtime"] = "plugin",
        name: str = "nri",
    ) -> None:
        if role == "plugin":
            self.server_conn, self.client_conn = PLUGIN_CONN, RUNTIME_CONN
        elif role == "runtime":
            self.server_conn, self.client_conn = RUNTIME_CONN, PLUGIN_CONN
        else:
            raise ValueError(f"role must be 'plugin' or 'runtime', not {role!r}")
        self.role = role
        self.name = name
        #: The request handlers; may be changed at any time.
        self.handlers: dict[tuple[str, str], Handler] = dict(handlers or {})
        #: Set once the connection is closed.
        self.closed = asyncio.Event()
        #: Why the connection closed (``None`` while it is open).
        self.close_reason: ConnectionClosed | None = None

        self._reader = reader
        self._writer = writer
        self._demux = Demultiplexer()
        self._server_decoder = MessageDecoder()
        self._client_decoder = MessageDecoder()
        self._server = ServerSession()
        self._client = ClientSession()
        self._pending: dict[int, tuple[asyncio.Future[CallResult], str]] = {}
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._read_task: asyncio.Task[None] | None = None
        self._closing = False
        #: Seconds :meth:`close` waits for unsent bytes before dropping them.
        self.close_timeout = 1.0

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, path: str, handlers: Mapping[tuple[str, str], Handler] | None = None, **kwargs
    ) -> NriConnection:
        """Connect to a unix socket path (e.g. ``/var/run/nri/nri.sock``) and start."""
        reader, writer = await asyncio.open_unix_connection(path)
        conn = cls(reader, writer, handlers, **kwargs)
        conn.start()
        return conn

    @classmethod
    async def from_socket(
        cls, sock: socket.socket, handlers: Mapping[tuple[str, str], Handler] | None = None, **kwargs
    ) -> NriConnection:
        """Wrap a connected stream socket (which the connection then owns) and start."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        conn = cls(reader, writer, handlers, **kwargs)
        conn.start()
        return conn

    @classmethod
    async def from_fd(
        cls, fd: int, handlers: Mapping[tuple[str, str], Handler] | None = None, **kwargs
    ) -> NriConnection:
        """Wrap an inherited socket fd (``NRI_PLUGIN_SOCKET`` of a launched plugin) and start."""
        return await cls.from_socket(socket.socket(fileno=fd), handlers, **kwargs)

    def start(self) -> None:
        """Start the read loop (idempotent; needs a running event loop)."""
        if self._read_task is None and not self._closing:
            self._read_task = asyncio.get_running_loop().create_task(
                self._read_loop(), name=f"{self.name}-read"
            )

    async def __aenter__(self) -> NriConnection:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- client side -------------------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> bytes:
        """Call ``service/method`` on the peer and return the reply payload.

        Raises :class:`TtrpcError` for an error status, :class:`CallTimeout`
        (an :class:`asyncio.TimeoutError`) if no reply came within *timeout*
        seconds (``None``: wait forever), and :class:`ConnectionClosed` if the
        connection is or becomes closed.
        """
        self.start()
        what = f"{service}/{method}"
        timeout_ns = 0 if timeout is None else max(1, int(timeout * 1e9))
        sid: int | None = None
        future: asyncio.Future[CallResult] | None = None
        try:
            async with asyncio.timeout(timeout) as deadline:
                async with self._write_lock:
                    # Allocate the stream id and send under one lock so that
                    # ids go out on the wire in increasing order.
                    self._check_open(what)
                    sid, message = self._client.start_call(
                        service, method, payload, timeout_ns, metadata
                    )
                    future = asyncio.get_running_loop().create_future()
                    self._pending[sid] = (future, what)
                    log.debug("%s: call %s stream %d", self.name, what, sid)
                    await self._write(self.client_conn, message)
                result = await future
        except TimeoutError:
            if not deadline.expired():
                raise
            log.debug("%s: call %s stream %s timed out", self.name, what, sid)
            raise CallTimeout(
                f"{what} got no reply within {timeout} s", service=service, method=method,
                stream_id=sid if sid is not None else 0,
            ) from None
        finally:
            if sid is not None:
                self._pending.pop(sid, None)
                self._client.cancel(sid)
            if future is not None:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # mark as retrieved when we raise something else
        if not result.ok:
            raise TtrpcError(result.status_code, result.status_message)
        return result.payload

    # -- closing -----------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closing

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await self.closed.wait()

    async def close(self) -> None:
        """Close the connection: fail pending calls, stop handlers, close the socket.

        Safe to call any number of times, from any task (handlers included).
        """
        self._shutdown(ConnectionClosed(f"{self.name}: connection closed locally"))
        current = asyncio.current_task()
        tasks = [t for t in (self._read_task, *self._tasks) if t is not None and t is not current]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            # Lets already written bytes drain; a peer that reads nothing
            # must not make close() hang.
            await asyncio.wait_for(asyncio.shield(self._writer.wait_closed()), self.close_timeout)
        except Exception:
            self._writer.transport.abort()

    def _shutdown(self, reason: ConnectionClosed) -> None:
        """Synchronous part of closing; the first reason wins."""
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        log.debug("%s: closing: %s", self.name, reason)
        for sid, (future, what) in list(self._pending.items()):
            if not future.done():
                error = ConnectionClosed(f"{what} (stream {sid}) failed: {reason}")
                error.__cause__ = reason
                future.set_exception(error)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self._read_task is not None and self._read_task is not current:
            self._read_task.cancel()
        self._writer.close()
        self.closed.set()

    def _check_open(self, what: str) -> None:
        if self._closing:
            raise ConnectionClosed(f"cannot send {what}: {self.close_reason}")

    # -- reading -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason: ConnectionClosed | None = None
        try:
            while True:
                try:
                    data = await self._reader.read(_READ_SIZE)
                except OSError as exc:
                    reason = ConnectionClosed(f"{self.name}: read failed: {exc}")
                    reason.__cause__ = exc
                    return
                if not data:
                    reason = ConnectionClosed(f"{self.name}: peer closed the connection")
                    return
                try:
                    self._process(data)
                except ProtocolError as exc:
                    log.warning("%s: protocol error, closing: %s", self.name, exc)
                    reason = ConnectionClosed(f"{self.name}: protocol error: {exc}")
                    reason.__cause__ = exc
                    return
        except asyncio.CancelledError:
            reason = ConnectionClosed(f"{self.name}: connection closed locally")
            raise
        except Exception as exc:  # a bug here must not leave calls hanging
            log.exception("%s: read loop failed", self.name)
            reason = ConnectionClosed(f"{self.name}: internal error: {exc!r}")
            reason.__cause__ = exc
        finally:
            self._shutdown(reason or ConnectionClosed(f"{self.name}: connection closed"))

    def _process(self, data: bytes) -> None:
        for conn_id, chunk in self._demux.feed(data):
            if conn_id == self.server_conn:
                for message in self._server_decoder.feed(chunk):
                    self._on_server_message(message)
            elif conn_id == self.client_conn:
                for message in self._client_decoder.feed(chunk):
                    self._on_client_message(message)
            else:
                log.debug("%s: dropped %d bytes for conn %d", self.name, len(chunk), conn_id)

    def _on_client_message(self, message: Message | Oversized) -> None:
        result = self._client.receive(message)
        if isinstance(result, Ignored):
            log.debug("%s: ignored stream %d: %s", self.name, result.stream_id, result.reason)
            return
        entry = self._pending.get(result.stream_id)
        if entry is not None and not entry[0].done():
            entry[0].set_result(result)

    def _on_server_message(self, message: Message | Oversized) -> None:
        result = self._server.receive(message)
        if isinstance(result, IncomingRequest):
            log.debug(
                "%s: request %s/%s stream %d", self.name, result.service, result.method,
                result.stream_id,
            )
            self._spawn(self._serve(result), f"{self.name}-serve-{result.stream_id}")
        elif isinstance(result, RejectedRequest):
            log.warning(
                "%s: rejected message on stream %d: %s (code %d)", self.name, result.stream_id,
                result.message, result.code,
            )
            self._spawn(self._send_reply(result.data), f"{self.name}-reject-{result.stream_id}")
        else:
            log.debug("%s: ignored stream %d: %s", self.name, result.stream_id, result.reason)

    # -- serving -----------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _find_handler(self, service: str, method: str) -> Handler:
        handler = self.handlers.get((service, method))
        if handler is not None:
            return handler
        if any(known == service for known, _ in self.handlers):
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {method}")
        raise TtrpcError(Code.UNIMPLEMENTED, f"service {service}")

    async def _serve(self, request: IncomingRequest) -> None:
        sid = request.stream_id
        what = f"{request.service}/{request.method}"
        try:
            handler = self._find_handler(request.service, request.method)
            result = await handler(request.payload, request.metadata)
            if result is None:
                result = b""
            if not isinstance(result, (bytes, bytearray, memoryview)):
                raise TypeError(f"handler for {what} returned {type(result).__name__}, not bytes")
            try:
                reply = self._server.respond(sid, bytes(result))
            except OversizedMessage as exc:
                log.error("%s: reply to %s is too large: %s", self.name, what, exc)
                reply = self._server.respond_error(sid, Code.RESOURCE_EXHAUSTED, str(exc))
        except TtrpcError as exc:
            # A status must be a non-zero int32; anything else becomes UNKNOWN.
            code = exc.code if 0 < exc.code < 2**31 else Code.UNKNOWN
            log.debug("%s: %s stream %d -> status %d %s", self.name, what, sid, code, exc.message)
            reply = self._server.respond_error(sid, code, str(exc.message))
        except Exception as exc:
            log.error("%s: handler for %s failed", self.name, what, exc_info=True)
            reply = self._server.respond_error(sid, Code.UNKNOWN, str(exc) or type(exc).__name__)
        await self._send_reply(reply)

    async def _send_reply(self, message: bytes) -> None:
        async with self._write_lock:
            if self._closing:
                log.debug("%s: reply dropped, connection closed", self.name)
                return
            with suppress(ConnectionClosed):
                await self._write(self.server_conn, message)

    # -- writing -----------------------------------------------------------------------------

    async def _write(self, conn_id: int, message: bytes) -> None:
        """Write one whole ttRPC message; the caller holds the write lock."""
        try:
            self._writer.write(mux.encode(conn_id, message))
            await self._writer.drain()
        except OSError as exc:
            reason = ConnectionClosed(f"{self.name}: write failed: {exc}")
            reason.__cause__ = exc
            self._shutdown(reason)
            raise reason from exc
