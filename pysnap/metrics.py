"""Prometheus metrics: a tiny registry rendering the text exposition format, and
an HTTP endpoint (loopback TCP or a unix socket) serving ``/metrics`` and
``/healthz``.  Each daemon has its own registry and endpoint."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from typing import Awaitable, Callable, Iterable, Sequence

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str]) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        return tuple(str(labels.get(n, "")) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(buckets) + (math.inf,)
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += value
            series[-1] += 1

    def render(self) -> list[str]:
        lines = []
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            for bound, count in zip(self.buckets, series):
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_number(count)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(series[-1])}")
        return lines


class Gauge(_Metric):
    """A gauge read at scrape time from ``collect() -> {label values: value}``."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str],
                 collect: Callable[[], dict[tuple[str, ...], float]]) -> None:
        super().__init__(name, help_text, labels)
        self.collect = collect

    def render(self) -> list[str]:
        try:
            items = sorted(self.collect().items())
        except Exception as exc:  # a failing collector must not break the scrape
            log.warning("metric %s: %s", self.name, exc)
            return []
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Registry:
    def __init__(self, namespace: str = "pysnap") -> None:
        self.namespace = namespace
        self._metrics: list[_Metric] = []

    def _add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help_text: str, labels: Iterable[str] = ()) -> Counter:
        return self._add(Counter(f"{self.namespace}_{name}", help_text, tuple(labels)))  # type: ignore[return-value]

    def histogram(self, name: str, help_text: str, labels: Iterable[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(f"{self.namespace}_{name}", help_text, tuple(labels), buckets))  # type: ignore

    def gauge(self, name: str, help_text: str, labels: Iterable[str],
              collect: Callable[[], dict[tuple[str, ...], float]]) -> Gauge:
        return self._add(Gauge(f"{self.namespace}_{name}", help_text, tuple(labels), collect))  # type: ignore

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines += metric.header() + metric.render()
        return "\n".join(lines) + "\n"


def parse_endpoint(address: str) -> tuple[str, str | int]:
    """``unix:/path`` → ("unix", path); ``host:port`` on loopback → (host, port)."""
    if address.startswith("unix:"):
        return "unix", address[len("unix:"):]
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r}: expected 127.0.0.1:PORT or unix:/path")
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"metrics address {address!r}: only loopback addresses are allowed")
    return host, int(port)


async def start_endpoint(address: str, registry: Registry,
                         healthy: Callable[[], Awaitable[bool]]) -> asyncio.AbstractServer:
    """Serve ``GET /metrics`` and ``GET /healthz`` over minimal HTTP/1.0."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = request.split(b"\r\n", 1)[0].split()
            path = parts[1].decode() if len(parts) > 1 else "/"
            if len(parts) < 2 or parts[0] != b"GET":
                status, body, ctype = "405 Method Not Allowed", "only GET\n", "text/plain"
            elif path == "/metrics":
                status, body, ctype = "200 OK", registry.render(), "text/plain; version=0.0.4; charset=utf-8"
            elif path == "/healthz":
                ok = await healthy()
                status, body, ctype = ("200 OK", "ok\n", "text/plain") if ok else (
                    "503 Service Unavailable", "unhealthy\n", "text/plain")
            else:
                status, body, ctype = "404 Not Found", "try /metrics or /healthz\n", "text/plain"
            data = body.encode()
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    kind, where = parse_endpoint(address)
    if kind == "unix":
        os.makedirs(os.path.dirname(str(where)) or ".", exist_ok=True)
        server = await asyncio.start_unix_server(handle, path=str(where))
        os.chmod(str(where), 0o660)
        return server
    return await asyncio.start_server(handle, host=kind, port=int(where))


def remove_endpoint(address: str) -> None:
    """Remove a unix endpoint's socket file once its server is closed."""
    if address.startswith("unix:"):
        try:
            os.unlink(address[len("unix:"):])
        except FileNotFoundError:
            pass
