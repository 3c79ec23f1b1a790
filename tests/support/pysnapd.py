"""`pysnap serve snapshotter` (or `serve content`) as a child process of the tests, started and stopped by pid."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from .containerd import PYSNAP
from .processes import terminate


class PysnapDaemon:
    """`pysnap serve SERVICE --root ROOT --address SOCK`; ready when the socket accepts connections.

    service: "snapshotter" (default) or "content"."""

    def __init__(self, root: Path, address: Path, log_path: Path, service: str = "snapshotter"):
        self.root, self.address, self.log_path, self.service = root, address, log_path, service
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 30.0) -> "PysnapDaemon":
        assert PYSNAP.exists(), f"{PYSNAP} does not exist: run scripts/provision.sh"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(PYSNAP), "serve", self.service, "--root", str(self.root), "--address", str(self.address)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pysnap exited with {self.proc.returncode} at start; log:\n{self.log_tail()}")
            if self.address.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(str(self.address))
                        return self
                    except OSError:
                        pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pysnap not ready after {timeout}s; log:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.returncode = terminate(proc, timeout)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
