"""Serving a gRPC API on a unix socket: the glue every pysnap daemon shares.

- ``ErrorMapping``: the one place that turns pysnap errors into gRPC status codes
  (and any unexpected exception into UNKNOWN with its text, logged with a trace).
- ``serve``: binds a grpc.aio server to a unix socket created 0660, reports
  readiness to systemd, drains in-flight RPCs on SIGTERM/SIGINT and returns.
"""
from __future__ import annotations

import asyncio
import grp
import inspect
import logging
import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from grpc import aio

from . import errors

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # what containerd dials proxy plugins with
DRAIN_SECONDS = 10.0

STATUS_OF = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Unknown: grpc.StatusCode.UNKNOWN,
}


def error_from_status(code: grpc.StatusCode, message: str) -> errors.PysnapError:
    """The pysnap error for a status a peer (e.g. containerd) answered with."""
    for cls, status in STATUS_OF.items():
        if status == code:
            suffix = ": " + cls.kind
            return cls(message[: -len(suffix)] if message.endswith(suffix) else message)
    return errors.Unknown(f"{code.name}: {message}")


def status_of(exc: errors.PysnapError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


async def _abort_with(context: aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, errors.PysnapError):
        await context.abort(status_of(exc), str(exc))
    log.exception("%s failed unexpectedly", method)
    await context.abort(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")


def _wrap(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def streaming(request: Any, context: aio.ServicerContext) -> Any:
            try:
                async for response in behavior(request, context):
                    yield response
            except (asyncio.CancelledError, aio.AbortError):
                raise
            except Exception as exc:
                await _abort_with(context, exc, method)
        return streaming

    async def unary(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (asyncio.CancelledError, aio.AbortError):
            raise
        except Exception as exc:
            await _abort_with(context, exc, method)
    return unary


class ErrorMapping(aio.ServerInterceptor):
    """Wraps every handler so domain errors leave as the right status code."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                factory = getattr(grpc, f"{kind}_rpc_method_handler")
                return factory(
                    _wrap(behavior, method),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


def sd_notify(message: str) -> None:
    """Send ``message`` to systemd when run as a ``Type=notify`` unit."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(target)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify(%s) failed: %s", message, exc)


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SystemExit(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # stale socket of a previous run
    else:
        raise SystemExit(f"{path} is in use by another process")
    finally:
        probe.close()


async def serve(
    address: Path,
    register: Callable[[aio.Server], None],
    *,
    name: str,
    socket_group: str = "",
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight RPCs and return."""
    address = Path(address)
    # Catch stop signals before the socket exists: a client (or systemd) may signal us as
    # soon as it can connect, and the default action would skip the drain and the unlink.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    _prepare_socket_path(address)
    server = aio.server(
        interceptors=[ErrorMapping()],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    register(server)
    old_umask = os.umask(0o117)
    try:
        server.add_insecure_port(f"unix://{address}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(address, 0o660)
    if socket_group:
        os.chown(address, -1, grp.getgrnam(socket_group).gr_gid)

    log.info("%s serving on %s", name, address)
    sd_notify("READY=1")
    await stopping.wait()
    sd_notify("STOPPING=1")
    log.info("%s stopping: draining in-flight requests", name)
    await server.stop(DRAIN_SECONDS)
    if on_stop is not None:
        await on_stop()
    try:
        os.unlink(address)
    except FileNotFoundError:
        pass
    log.info("%s stopped", name)
