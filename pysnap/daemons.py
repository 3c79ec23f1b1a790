"""Running pysnap daemons: one process, one event loop, one or all three daemons.

Each daemon gets a ``DaemonContext``: the shared stop event (set by SIGTERM or
SIGINT), its own metrics registry and endpoint, a readiness event, and health
probes.  The process tells systemd READY=1 once every daemon is ready, and
pings the systemd watchdog only while every probe answers — a probe runs a
real query against the daemon's store in its thread pool, so a wedged event
loop, pool or database stops the pings and systemd restarts the service.

With one daemon, a crash ends the process (systemd restarts it).  With
``serve all``, a crashed daemon is restarted in-process with backoff.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from .config import Config
from .metrics import Registry, remove_endpoint, start_endpoint
from .server import sd_notify

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[None]]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters
PROBE_TIMEOUT = 5.0


@dataclass
class DaemonContext:
    name: str
    stopping: asyncio.Event
    metrics: Registry = field(default_factory=Registry)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    probes: list[Probe] = field(default_factory=list)
    grpc_services: tuple[str, ...] = ()
    health: object = None  # the gRPC health servicer, once serving

    async def healthy(self) -> bool:
        for probe in self.probes:
            try:
                await asyncio.wait_for(probe(), PROBE_TIMEOUT)
            except Exception as exc:
                log.warning("%s health probe failed: %s", self.name, exc or type(exc).__name__)
                return False
        return True


def metrics_address(config: Config, name: str) -> str:
    """The metrics endpoint of daemon ``name``: configured, or a unix socket beside its own."""
    section = getattr(config, name)
    if section.metrics_address:
        return "" if section.metrics_address == "off" else section.metrics_address
    if name == "nri":
        return f"unix:{section.mount_root}/metrics.sock"
    address = str(section.address)
    return f"unix:{address.removesuffix('.sock')}-metrics.sock"


def _runner(config: Config, name: str, log_events: bool) -> Callable[[DaemonContext], Awaitable[None]]:
    if name == "snapshotter":
        from snapshotter.daemon import run as run_snapshotter
        return lambda ctx: run_snapshotter(config.snapshotter, ctx)
    if name == "content":
        from content.daemon import run as run_content
        return lambda ctx: run_content(config.content, ctx)
    if name == "nri":
        from nri_bridge.daemon import run as run_nri
        return lambda ctx: run_nri(config.nri, config.snapshotter.root, ctx, log_events=log_events)
    raise ValueError(f"unknown daemon {name!r}")


async def _supervise(name: str, run: Callable[[DaemonContext], Awaitable[None]], ctx: DaemonContext,
                     restart: bool) -> None:
    delay = 1.0
    while True:
        try:
            await run(ctx)
            return
        except Exception:
            if not restart or ctx.stopping.is_set():
                raise
            log.exception("%s crashed; restarting in %.0f s", name, delay)
        try:
            await asyncio.wait_for(ctx.stopping.wait(), delay)
            return
        except asyncio.TimeoutError:
            delay = min(delay * 2, 30.0)
            ctx.ready.clear()


async def _watchdog(contexts: Sequence[DaemonContext], stopping: asyncio.Event) -> None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return
    interval = int(usec) / 2_000_000
    log.info("systemd watchdog: pinging every %.1f s while healthy", interval)
    while not stopping.is_set():
        if all([await ctx.healthy() for ctx in contexts]):
            sd_notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stopping.wait(), interval)
        except asyncio.TimeoutError:
            pass


def keep_large_buffers() -> None:
    """Let glibc keep freed message-sized buffers instead of unmapping them: every 1 MiB
    gRPC message (blob data) otherwise costs an mmap, page faults and a munmap, which
    measured 20–40 % of the content store's throughput (docs/benchmarks.md)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


async def run_daemons(config: Config, names: Sequence[str], log_events: bool = False) -> None:
    keep_large_buffers()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before anything binds: a stop signal must always mean a clean drain.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    contexts = [DaemonContext(name, stopping) for name in names]
    tasks = [asyncio.create_task(_supervise(c.name, _runner(config, c.name, log_events), c, restart=len(names) > 1),
                                 name=c.name) for c in contexts]
    endpoints = []
    helpers = []
    try:
        readiness = asyncio.gather(*(c.ready.wait() for c in contexts))
        done, _ = await asyncio.wait([*tasks, readiness], return_when=asyncio.FIRST_COMPLETED)
        if readiness in done:
            for ctx in contexts:
                address = metrics_address(config, ctx.name)
                if address:
                    endpoints.append((address, await start_endpoint(address, ctx.metrics, ctx.healthy)))
            sd_notify("READY=1")
            helpers.append(asyncio.create_task(_watchdog(contexts, stopping)))
        else:
            readiness.cancel()
        await asyncio.gather(*tasks)
    finally:
        stopping.set()
        sd_notify("STOPPING=1")
        for task in helpers:
            task.cancel()
        for address, endpoint in endpoints:
            endpoint.close()
            remove_endpoint(address)
        for task in tasks:
            if not task.done():
                await asyncio.wait({task}, timeout=30)
