"""Asking running daemons how they are, from the operator commands (doctor, status):
does a unix socket accept connections, what does the gRPC health service say,
what does a metrics endpoint's ``/healthz`` answer, which version is containerd.

Every probe has a short timeout and returns a value instead of raising: a
wedged daemon is a finding, not a crash of the command reporting it.
"""
from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from .metrics import parse_endpoint

TIMEOUT = 3.0


@dataclass(frozen=True)
class SocketState:
    exists: bool
    is_socket: bool = False
    accepts: bool = False
    error: str = ""
    mode: int = 0
    uid: int = -1
    gid: int = -1


def probe_socket(path: Path, timeout: float = TIMEOUT) -> SocketState:
    """Whether ``path`` is a unix socket something accepts connections on, and its owner and mode."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return SocketState(exists=False)
    except OSError as exc:
        return SocketState(exists=False, error=exc.strerror or str(exc))
    mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    if not stat.S_ISSOCK(st.st_mode):
        return SocketState(True, False, False, "not a socket", mode, uid, gid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except OSError as exc:
            return SocketState(True, True, False, exc.strerror or type(exc).__name__, mode, uid, gid)
    return SocketState(True, True, True, "", mode, uid, gid)


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    return probe_socket(path, timeout).accepts


def grpc_health(path: Path, service: str = "", timeout: float = TIMEOUT) -> str:
    """The gRPC health status of ``service`` on the unix socket ``path``: SERVING,
    NOT_SERVING, SERVICE_UNKNOWN…, or what went wrong (UNIMPLEMENTED, DEADLINE_EXCEEDED…)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(f"unix://{path}")
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    except grpc.RpcError as exc:
        return exc.code().name if hasattr(exc, "code") else str(exc)
    finally:
        channel.close()


def http_get(address: str, path: str, timeout: float = TIMEOUT) -> tuple[int, str]:
    """GET ``path`` from a metrics endpoint (``unix:/path`` or ``127.0.0.1:PORT``):
    (HTTP status, body); status 0 and the error text when it can't be reached."""
    try:
        kind, where = parse_endpoint(address)
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = str(where)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in kind else socket.AF_INET, socket.SOCK_STREAM)
            target = (kind, int(where))
        with sock:
            sock.settimeout(timeout)
            sock.connect(target)  # type: ignore[arg-type]
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: pysnap\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except (OSError, ValueError) as exc:
        return 0, getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, "not an HTTP answer"
    return status, body.decode(errors="replace")


def containerd_version_via_socket(address: Path, timeout: float = TIMEOUT) -> str:
    """containerd's version from its Version API on ``address`` ("" if it does not answer)."""
    import grpc

    channel = grpc.insecure_channel(f"unix://{address}")
    try:
        call = channel.unary_unary("/containerd.services.version.v1.Version/Version",
                                   request_serializer=lambda _: b"", response_deserializer=lambda raw: raw)
        raw = call(None, timeout=timeout)
    except grpc.RpcError:
        return ""
    finally:
        channel.close()
    return _string_field(raw, 1)


def _string_field(raw: bytes, number: int) -> str:
    """Field ``number`` (a string) of a serialized protobuf message ("" if absent)."""
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            byte = raw[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    try:
        while i < len(raw):
            key = varint()
            wire = key & 7
            if wire == 0:
                varint()
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                length = varint()
                if key >> 3 == number:
                    return raw[i:i + length].decode(errors="replace")
                i += length
            else:
                return ""
    except IndexError:
        pass
    return ""
