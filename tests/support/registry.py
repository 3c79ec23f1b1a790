"""A throw-away OCI registry for tests, and a minimal pusher for images built by tests/support/images.py.

The registry is Debian bookworm's `docker-registry` (distribution 2.8) bound to 127.0.0.1 on a free port, with its
storage in a temporary directory.  The pusher speaks the registry HTTP API v2 with urllib only:
monolithic blob uploads (POST then PUT ?digest=) and a manifest PUT with the OCI manifest media type.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from .processes import terminate

if TYPE_CHECKING:
    from .images import Image

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """docker-registry serving 127.0.0.1:<port>; use as a context manager or call start()/stop()."""

    def __init__(self, binary: str | os.PathLike[str], workdir: str | os.PathLike[str] | None = None):
        self.binary = str(binary)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="pysnap-registry-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def start(self, timeout: float = 30.0) -> "Registry":
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        # A port picked here can be taken before the registry binds it: retry with another one.
        for _attempt in range(3):
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(
                "version: 0.1\n"
                "log:\n"
                "  level: warn\n"
                "  accesslog:\n"
                "    disabled: true\n"
                "storage:\n"
                "  filesystem:\n"
                f"    rootdirectory: {storage}\n"
                "  delete:\n"
                "    enabled: true\n"
                "http:\n"
                f"  addr: 127.0.0.1:{self.port}\n"
            )
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "serve", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready(timeout):
                return self
            self._terminate()
        raise RuntimeError(f"docker-registry did not come up; log:\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, timeout=10)

    def stop(self) -> None:
        self._terminate()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def push(self, image: "Image", repository: str, tag: str = "latest") -> str:
        """Push `image` as <repository>:<tag>; returns the full reference `127.0.0.1:PORT/<repository>:<tag>`."""
        push_image(self.url, image, repository, tag)
        return f"{self.host}/{repository}:{tag}"


def _request(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        return urllib.request.urlopen(req, timeout=120)
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        raise RuntimeError(f"{method} {url} -> HTTP {e.code}: {body}") from None


def _blob_exists(base_url: str, repository: str, digest: str) -> bool:
    req = urllib.request.Request(f"{base_url}/v2/{repository}/blobs/{digest}", method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


def push_blob(base_url: str, repository: str, digest: str, data: bytes) -> None:
    """Monolithic upload: POST /v2/<repo>/blobs/uploads/, then PUT <Location>?digest=<digest> with the bytes."""
    if _blob_exists(base_url, repository, digest):
        return
    with _request("POST", f"{base_url}/v2/{repository}/blobs/uploads/", data=b"") as resp:
        if resp.status != 202:
            raise RuntimeError(f"blob upload start for {digest}: HTTP {resp.status}")
        location = resp.headers["Location"]
    upload = urllib.parse.urljoin(f"{base_url}/", location)
    sep = "&" if urllib.parse.urlsplit(upload).query else "?"
    put_url = f"{upload}{sep}digest={urllib.parse.quote(digest, safe=':')}"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
    with _request("PUT", put_url, data=data, headers=headers) as resp:
        if resp.status != 201:
            raise RuntimeError(f"blob upload of {digest}: HTTP {resp.status}")
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise RuntimeError(f"registry stored {digest} as {got}")


def push_manifest(base_url: str, repository: str, tag: str, manifest: bytes, media_type: str) -> str:
    headers = {"Content-Type": media_type}
    with _request("PUT", f"{base_url}/v2/{repository}/manifests/{tag}", data=manifest, headers=headers) as resp:
        if resp.status != 201:
            raise RuntimeError(f"manifest PUT {repository}:{tag}: HTTP {resp.status}")
        return resp.headers.get("Docker-Content-Digest", "")


def push_image(base_url: str, image: "Image", repository: str, tag: str = "latest") -> None:
    """Upload every blob of `image` (config and layers), then its OCI manifest under `tag`."""
    for digest, data in image.blobs():
        push_blob(base_url, repository, digest, data)
    got = push_manifest(base_url, repository, tag, image.manifest, MEDIA_TYPE_OCI_MANIFEST)
    if got and got != image.manifest_digest:
        raise RuntimeError(f"registry stored manifest {image.manifest_digest} as {got}")
