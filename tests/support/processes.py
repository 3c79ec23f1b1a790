"""Ending child processes the tests started: by pid, politely first."""
from __future__ import annotations

import os
import signal
import subprocess


def terminate(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM ``proc`` (by pid), SIGKILL it if it has not exited after ``timeout``; its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode
