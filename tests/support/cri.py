"""A small client for containerd's CRI API (`runtime.v1.RuntimeService`), driving pods the way kubelet does.

The Python stubs are generated at test time, never committed: `grpc_tools.protoc` compiles the CRI `api.proto`
named by the toolchain variable PYSNAP_CRI_PROTO (Debian's golang-k8s-cri-api-dev) into a package directory under
`$PYSNAP_CACHE/cri-stubs/<key>/`, where <key> hashes the proto and the grpc_tools version, so a changed proto or
compiler gives a fresh build.  The package is imported from there by path, without touching sys.path.

Pods run with host networking (no CNI needed) and no hostname, as kubelet asks for them; container output is read
with ExecSync, which needs no streaming server.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import grpc

from . import toolchain

PACKAGE = "pysnap_test_cri_v1"  # import name of the generated package


# ------------------------------------------------------------------------------------------------ stubs

def _stub_key(proto: Path) -> str:
    h = hashlib.sha256(proto.read_bytes())
    h.update(importlib.metadata.version("grpcio-tools").encode())
    h.update(PACKAGE.encode())
    return h.hexdigest()[:16]


def _generate(proto: Path, out: Path) -> None:
    """Compile `proto` into `out/PACKAGE/` (api_pb2.py, api_pb2_grpc.py); atomic: built aside, then renamed."""
    from grpc_tools import protoc

    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        package = build / PACKAGE
        package.mkdir()
        shutil.copyfile(proto, package / "api.proto")
        (package / "__init__.py").write_text("# generated at test time from the CRI api.proto; not committed\n")
        include = Path(protoc.__file__).parent / "_proto"  # well-known types (the CRI proto needs none today)
        argv = ["grpc_tools.protoc", f"-I{build}", f"-I{include}", f"--python_out={build}",
                f"--grpc_python_out={build}", f"{PACKAGE}/api.proto"]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {proto} (argv {argv})")
        try:
            os.rename(build, out)
        except OSError:
            if not (out / PACKAGE / "api_pb2_grpc.py").is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)


@cache
def stubs() -> tuple[ModuleType, ModuleType]:
    """(api_pb2, api_pb2_grpc) of the CRI runtime.v1 API, generated on first use."""
    proto = Path(toolchain.require("PYSNAP_CRI_PROTO"))
    out = toolchain.cache_dir() / "cri-stubs" / _stub_key(proto)
    if not (out / PACKAGE / "api_pb2_grpc.py").is_file():
        _generate(proto, out)
    if PACKAGE not in sys.modules:
        init = out / PACKAGE / "__init__.py"
        spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(init.parent)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.api_pb2"), importlib.import_module(f"{PACKAGE}.api_pb2_grpc")


# ------------------------------------------------------------------------------------------------ client

class CriError(RuntimeError):
    """A failed CRI call: `code` is the grpc.StatusCode, `details` the runtime's message."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        self.method, self.code, self.details = method, code, details
        super().__init__(f"CRI {method} failed: {code.name}: {details}")


@dataclass(frozen=True)
class Pod:
    id: str
    config: object  # runtime.v1.PodSandboxConfig, passed again to CreateContainer as kubelet does


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


class CriClient:
    """RuntimeService on containerd's gRPC socket `address` (CRI is served on the main socket)."""

    def __init__(self, address: str | os.PathLike[str], timeout: float = 60.0):
        self.api, grpc_api = stubs()
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self._runtime = grpc_api.RuntimeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CriClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self._runtime, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise CriError(method, exc.code(), exc.details() or "") from None

    # -------------------------------------------------------------------------------------------- pods
    def run_pod_sandbox(self, name: str, *, annotations: dict[str, str] | None = None, namespace: str = "default",
                        labels: dict[str, str] | None = None, log_directory: str = "") -> Pod:
        """A host-network pod without hostname (like kubelet's for hostNetwork pods)."""
        api = self.api
        config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace=namespace, attempt=0),
            annotations=annotations or {},
            labels=labels or {},
            log_directory=log_directory,
            linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
                namespace_options=api.NamespaceOption(network=api.NODE))),
        )
        response = self._call("RunPodSandbox", api.RunPodSandboxRequest(config=config))
        return Pod(response.pod_sandbox_id, config)

    def stop_pod_sandbox(self, pod_id: str) -> None:
        self._call("StopPodSandbox", self.api.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod_sandbox(self, pod_id: str) -> None:
        self._call("RemovePodSandbox", self.api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def list_pod_sandboxes(self) -> list:
        return list(self._call("ListPodSandbox", self.api.ListPodSandboxRequest()).items)

    # -------------------------------------------------------------------------------------------- containers
    def create_container(self, pod: Pod, name: str, image: str, *, command: list[str] | None = None,
                         args: list[str] | None = None, annotations: dict[str, str] | None = None,
                         log_path: str = "") -> str:
        api = self.api
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=0),
            image=api.ImageSpec(image=image),
            command=command or [],
            args=args or [],
            annotations=annotations or {},
            log_path=log_path,
        )
        request = api.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config)
        return self._call("CreateContainer", request).container_id

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", self.api.StartContainerRequest(container_id=container_id))

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        """Stop; `timeout` 0 kills at once (SIGKILL), like kubelet with no grace period."""
        self._call("StopContainer", self.api.StopContainerRequest(container_id=container_id, timeout=timeout))

    def remove_container(self, container_id: str) -> None:
        self._call("RemoveContainer", self.api.RemoveContainerRequest(container_id=container_id))

    def container_status(self, container_id: str):
        """runtime.v1.ContainerStatus (state, exit_code, mounts from the CRI config, ...)."""
        request = self.api.ContainerStatusRequest(container_id=container_id)
        return self._call("ContainerStatus", request).status

    def list_containers(self, pod_id: str = "") -> list:
        filt = self.api.ContainerFilter(pod_sandbox_id=pod_id) if pod_id else None
        return list(self._call("ListContainers", self.api.ListContainersRequest(filter=filt)).containers)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 30) -> ExecResult:
        """Run `cmd` in the running container and wait for it (ExecSync: no streaming server needed)."""
        request = self.api.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout)
        response = self._call("ExecSync", request, timeout=timeout + 30)
        return ExecResult(response.exit_code, response.stdout.decode(errors="replace"),
                          response.stderr.decode(errors="replace"))

    def run_container(self, pod: Pod, name: str, image: str, **kwargs) -> str:
        """CreateContainer + StartContainer; returns the container id."""
        container_id = self.create_container(pod, name, image, **kwargs)
        self.start_container(container_id)
        return container_id

    def remove_pod(self, pod_id: str) -> None:
        """StopPodSandbox + RemovePodSandbox (which removes the pod's containers too), as kubelet does."""
        self.stop_pod_sandbox(pod_id)
        self.remove_pod_sandbox(pod_id)
