"""Serving a gRPC API on a unix socket: the glue every pysnap daemon shares.

- ``ErrorMapping``: the one place that turns pysnap errors into gRPC status codes
  (and any unexpected exception into UNKNOWN with its text, logged with a trace).
  It also counts every RPC by method and code, times it, and gives it a
  request id for the log.
- ``serve``: binds a grpc.aio server to a unix socket created 0660 (with the
  gRPC health service), marks the daemon ready, and when the daemon is asked to
  stop drains in-flight RPCs and returns.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import inspect
import logging
import os
import socket
import stat
import time
from pathlib import Path
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import errors
from .logs import new_request_id
from .metrics import Registry

if TYPE_CHECKING:
    from .daemons import DaemonContext

log = logging.getLogger(__name__)
T = TypeVar("T")

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


# Codes that are part of normal operation (containerd probes with Stat, GC removes
# snapshots that have children, …): logged at debug, not as warnings.
EXPECTED_CODES = {
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OUT_OF_RANGE,
}


class RpcMetrics:
    def __init__(self, registry: Registry) -> None:
        self.calls = registry.counter("rpc_requests_total", "RPCs served, by method and status code.",
                                      ("method", "code"))
        self.seconds = registry.histogram("rpc_duration_seconds", "Time to serve an RPC, by method.", ("method",))

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self.calls.inc(method=name, code=code.name)
        self.seconds.observe(seconds, method=name)


class _Observed:
    """Status code bookkeeping of one RPC."""

    def __init__(self, method: str, metrics: RpcMetrics | None) -> None:
        self.method, self.metrics = method, metrics
        self.rid = new_request_id()
        self.started = time.perf_counter()

    def done(self, code: grpc.StatusCode, message: str = "") -> None:
        elapsed = time.perf_counter() - self.started
        if self.metrics:
            self.metrics.record(self.method, code, elapsed)
        if code is grpc.StatusCode.OK or code in EXPECTED_CODES or code is grpc.StatusCode.CANCELLED:
            log.debug("%s %s in %.3f ms %s", self.method, code.name, elapsed * 1000, message)
        else:
            log.warning("%s %s in %.3f ms: %s", self.method, code.name, elapsed * 1000, message)


async def _abort_with(context: aio.ServicerContext, exc: BaseException, observed: _Observed) -> None:
    if isinstance(exc, errors.PysnapError):
        code, message = status_of(exc), str(exc)
    else:
        log.exception("%s failed unexpectedly", observed.method)
        code, message = grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
    observed.done(code, message)
    await context.abort(code, message)


@contextlib.asynccontextmanager
async def _observing(method: str, metrics: RpcMetrics | None, context: aio.ServicerContext) -> AsyncIterator[None]:
    """Around one RPC: count and time it, and turn what it raises into its status."""
    observed = _Observed(method, metrics)
    try:
        yield
    except asyncio.CancelledError:
        observed.done(grpc.StatusCode.CANCELLED)
        raise
    except aio.AbortError:
        raise
    except Exception as exc:
        await _abort_with(context, exc, observed)
    else:
        observed.done(grpc.StatusCode.OK)


def _wrap(behavior: Callable[..., Any], method: str, metrics: RpcMetrics | None) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def streaming(request: Any, context: aio.ServicerContext) -> Any:
            async with _observing(method, metrics, context):
                async for response in behavior(request, context):
                    yield response
        return streaming

    async def unary(request: Any, context: aio.ServicerContext) -> Any:
        async with _observing(method, metrics, context):
            return await behavior(request, context)
    return unary


class ErrorMapping(aio.ServerInterceptor):
    """Wraps every handler so domain errors leave as the right status code, and
    every RPC is counted, timed and given a request id."""

    def __init__(self, metrics: RpcMetrics | None = None) -> None:
        self.metrics = metrics

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
                    _wrap(behavior, method, self.metrics),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


async def in_pool(executor: Executor, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the daemon's bounded thread pool: disk work never runs on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))


class RunsInPool:
    """For servicers: domain calls go to the daemon's thread pool (``self._executor``)."""

    _executor: Executor

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await in_pool(self._executor, fn, *args)

    async def _run_to_completion(self, fn: Callable[..., T], *args: Any) -> T:
        """Like ``_run``, but cancelling the RPC does not cancel the call: it runs to its end
        in the pool, so whatever it takes or releases (a lock, a file) is never lost."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))
        return await asyncio.shield(future)


@contextlib.asynccontextmanager
async def worker_pool(workers: int, name: str) -> AsyncIterator[ThreadPoolExecutor]:
    """A daemon's thread pool: drained on a normal stop, abandoned after a failure."""
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        yield executor
    except BaseException:
        executor.shutdown(wait=False)
        raise
    executor.shutdown(wait=True)


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
    context: "DaemonContext",
    *,
    socket_group: str = "",
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until ``context.stopping`` is set, then drain in-flight RPCs and return."""
    address = Path(address)
    _prepare_socket_path(address)
    server = aio.server(
        interceptors=[ErrorMapping(RpcMetrics(context.metrics))],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    register(server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    old_umask = os.umask(0o117)
    try:
        server.add_insecure_port(f"unix://{address}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(address, 0o660)
    if socket_group:
        os.chown(address, -1, grp.getgrnam(socket_group).gr_gid)
    for service in ("", *context.grpc_services):
        await health_service.set(service, health_pb2.HealthCheckResponse.SERVING)
    context.health = health_service
    log.info("%s serving on %s", context.name, address)
    context.ready.set()
    await context.stopping.wait()
    log.info("%s stopping: draining in-flight requests", context.name)
    await health_service.enter_graceful_shutdown()
    await server.stop(DRAIN_SECONDS)
    if on_stop is not None:
        await on_stop()
    try:
        os.unlink(address)
    except FileNotFoundError:
        pass
    log.info("%s stopped", context.name)
