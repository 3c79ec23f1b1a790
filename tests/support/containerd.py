"""An isolated containerd (1.7.24 or 2.1.9, from the provisioned cache) for tests.

Every instance gets its own root, state, gRPC and ttRPC sockets, NRI socket/plugin directories and opt directory
under one work directory, so several can run at once next to a system containerd.  Facts this relies on are in
/work/shared/reference/environment.md (CRI needs `restrict_oom_score_adj = true` here; config `version = 2` for
1.7 and `version = 3` for 2.x; containerd deletes whatever socket sits at its NRI `socket_path`).

Tables this module writes (an `extra_config` must not define them again; sub-tables are fine):
  1.7: [grpc] [ttrpc] [plugins."io.containerd.grpc.v1.cri"] [plugins."io.containerd.nri.v1.nri"]
       [plugins."io.containerd.internal.v1.opt"]
  2.x: the same, plus [plugins."io.containerd.cri.v1.runtime"]
       (and [plugins."io.containerd.cri.v1.images".pinned_images] when a sandbox_image is given)
The pysnap snippet (`pysnap config containerd ...`) goes in verbatim right after the top-level keys (it may set
top-level keys itself, e.g. `disabled_plugins`); `extra_config` goes at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import toolchain
from .processes import terminate

REPO = Path(__file__).resolve().parents[2]
PYSNAP = REPO / ".venv" / "bin" / "pysnap"

VERSIONS = ("1.7", "2")
_BIN_DIR_TOOL = {"1.7": "PYSNAP_CONTAINERD_17", "2": "PYSNAP_CONTAINERD_21"}


class CtrError(RuntimeError):
    def __init__(self, argv: list[str], proc: subprocess.CompletedProcess[str]):
        self.argv, self.returncode, self.stdout, self.stderr = argv, proc.returncode, proc.stdout, proc.stderr
        super().__init__(f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def _toml_str(value: str | os.PathLike[str]) -> str:
    return json.dumps(str(value))  # a JSON string of plain text is a valid TOML basic string


def pysnap_snippet(version: str, *, snapshotter_address: str | os.PathLike[str] | None = None,
                   snapshotter_root: str | os.PathLike[str] | None = None,
                   content_address: str | os.PathLike[str] | None = None) -> str:
    """`pysnap config containerd --version V ...` output, verbatim, wiring in the parts whose address is given."""
    argv = [str(PYSNAP), "config", "containerd", "--version", version]
    parts = []
    if snapshotter_address is not None:
        parts.append("snapshotter")
        argv += ["--snapshotter-address", str(snapshotter_address)]
        if snapshotter_root is not None:
            argv += ["--snapshotter-root", str(snapshotter_root)]
    if content_address is not None:
        parts.append("content")
        argv += ["--content-address", str(content_address)]
    argv += ["--plugins", ",".join(parts)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(top: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below `top`, deepest (most recently mounted) first."""
    top = os.path.realpath(top)
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = _unescape_mountinfo(line.split()[4])
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return list(reversed(found))


def unmount_all_under(top: str | os.PathLike[str]) -> list[str]:
    """Unmount everything at or below `top` (lazily if a plain unmount fails); returns what was unmounted."""
    done = []
    for _round in range(5):
        points = mounts_under(top)
        if not points:
            break
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
            done.append(point)
    left = mounts_under(top)
    if left:
        raise RuntimeError(f"could not unmount {left}")
    return done


class Containerd:
    """One containerd daemon.  `version` is "1.7" or "2".

    snapshotter_address / content_address: wire pysnap's snapshotter / content store on these sockets in, with the
    snippet `pysnap config containerd` prints (snapshotter_root is passed on as `--snapshotter-root`).
    nri: enable NRI (on its own socket `nri.sock` in the work directory) or disable it.
    extra_config: TOML appended at the end (see the module docstring for the tables it must not repeat).
    sandbox_image: the CRI sandbox (pause) image reference; it must be local to namespace k8s.io before a pod
    runs (1.7: `sandbox_image` of the CRI plugin; 2.x: `pinned_images.sandbox` of the CRI images plugin).
    """

    def __init__(self, version: str, workdir: str | os.PathLike[str] | None = None, *,
                 snapshotter_address: str | os.PathLike[str] | None = None,
                 snapshotter_root: str | os.PathLike[str] | None = None,
                 content_address: str | os.PathLike[str] | None = None, nri: bool = False,
                 extra_config: str = "", log_level: str = "info", sandbox_image: str | None = None):
        if version not in VERSIONS:
            raise ValueError(f"containerd version must be one of {VERSIONS}, not {version!r}")
        self.version = version
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"ctrd{version}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.snapshotter_address = snapshotter_address
        self.snapshotter_root = snapshotter_root
        self.content_address = content_address
        self.nri = nri
        self.extra_config = extra_config
        self.log_level = log_level
        self.sandbox_image = sandbox_image
        self.bin_dir = Path(toolchain.require(_BIN_DIR_TOOL[version]))
        self.runc = Path(toolchain.require("PYSNAP_RUNC"))
        self.proc: subprocess.Popen[bytes] | None = None

    # -------------------------------------------------------------------------------------------- paths
    root = property(lambda self: self.workdir / "root")
    state = property(lambda self: self.workdir / "state")
    address = property(lambda self: self.workdir / "containerd.sock")
    ttrpc_address = property(lambda self: self.workdir / "containerd.sock.ttrpc")
    nri_socket = property(lambda self: self.workdir / "nri.sock")
    nri_plugin_path = property(lambda self: self.workdir / "nri-plugins")
    nri_plugin_config_path = property(lambda self: self.workdir / "nri-conf.d")
    config_path = property(lambda self: self.workdir / "config.toml")
    log_path = property(lambda self: self.workdir / "containerd.log")
    containerd_bin = property(lambda self: self.bin_dir / "containerd")
    ctr_bin = property(lambda self: self.bin_dir / "ctr")

    @property
    def env(self) -> dict[str, str]:
        """Environment for containerd: this version's shim, then bookworm runc, first on PATH."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), str(self.runc.parent), env.get("PATH", "/usr/bin:/bin")])
        env.pop("CONTAINERD_ADDRESS", None)
        env.pop("CONTAINERD_NAMESPACE", None)
        env.pop("CONTAINERD_SNAPSHOTTER", None)
        return env

    # -------------------------------------------------------------------------------------------- config
    def render_config(self) -> str:
        q = _toml_str
        lines = [
            f"version = {2 if self.version == '1.7' else 3}",
            f"root = {q(self.root)}",
            f"state = {q(self.state)}",
            "",
        ]
        if self.snapshotter_address is not None or self.content_address is not None:
            # Verbatim, right after the top-level keys: the snippet may set top-level keys (disabled_plugins).
            lines += [f"# ---- pysnap config containerd --version {self.version}",
                      pysnap_snippet(self.version, snapshotter_address=self.snapshotter_address,
                                     snapshotter_root=self.snapshotter_root,
                                     content_address=self.content_address).rstrip("\n"),
                      "# ---- end of pysnap's snippet",
                      ""]
        lines += [
            "[grpc]",
            f"  address = {q(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {q(self.ttrpc_address)}",
            "",
            "[debug]",
            f"  level = {q(self.log_level)}",
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(self.workdir / 'opt')}",
            "",
            '[plugins."io.containerd.grpc.v1.cri"]',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
        ]
        if self.version == "1.7":
            lines += ["  restrict_oom_score_adj = true"]
            if self.sandbox_image is not None:
                lines += [f"  sandbox_image = {q(self.sandbox_image)}"]
        else:
            lines += ["", '[plugins."io.containerd.cri.v1.runtime"]', "  restrict_oom_score_adj = true"]
            if self.sandbox_image is not None:
                lines += ["", '[plugins."io.containerd.cri.v1.images".pinned_images]',
                          f"  sandbox = {q(self.sandbox_image)}"]
        lines += [
            "",
            '[plugins."io.containerd.nri.v1.nri"]',
            f"  disable = {'false' if self.nri else 'true'}",
            f"  socket_path = {q(self.nri_socket)}",
            f"  plugin_path = {q(self.nri_plugin_path)}",
            f"  plugin_config_path = {q(self.nri_plugin_config_path)}",
            "",
        ]
        config = "\n".join(lines)
        if self.extra_config:
            config += "\n# ---- extra\n" + self.extra_config
        return config if config.endswith("\n") else config + "\n"

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60.0) -> "Containerd":
        for d in (self.root, self.state, self.nri_plugin_path, self.nri_plugin_config_path):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(self.containerd_bin), "--config", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd {self.version} exited with {self.proc.returncode} at start; "
                                   f"log:\n{self.log_tail()}")
            if self.address.exists():
                proc = self._run_ctr(["version"], env=None, timeout=10)
                if proc.returncode == 0 and "Server:" in proc.stdout:
                    return
                last = proc.stderr
            time.sleep(0.05)
        raise RuntimeError(f"containerd {self.version} not ready after {timeout}s ({last.strip()}); "
                           f"log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """Remove leftover tasks, SIGTERM containerd (by pid), unmount what is left under its directories."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self._remove_tasks()
            terminate(proc, timeout)
        unmount_all_under(self.workdir)
        for d in (self.root, self.state):
            shutil.rmtree(d, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _remove_tasks(self) -> None:
        """Kill and delete every task and container still known (their shims then exit), in every namespace."""
        try:
            namespaces = self.ctr("namespaces", "ls", "-q", timeout=10).stdout.split()
            for ns in namespaces:
                for task in self.ctr("tasks", "ls", "-q", namespace=ns, timeout=10).stdout.split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False, timeout=10)
                    self.ctr("tasks", "rm", "-f", task, namespace=ns, check=False, timeout=30)
                for container in self.ctr("containers", "ls", "-q", namespace=ns, timeout=10).stdout.split():
                    self.ctr("containers", "rm", container, namespace=ns, check=False, timeout=30)
        except (CtrError, subprocess.TimeoutExpired):
            pass

    def __enter__(self) -> "Containerd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------------------- ctr
    def _run_ctr(self, args: list[str], env: dict[str, str] | None, timeout: float, namespace: str = "default",
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        full_env = self.env
        full_env.update(env or {})
        argv = [str(self.ctr_bin), "--address", str(self.address), "--namespace", namespace, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=timeout, input=input)

    def ctr(self, *args: str, snapshotter: str | None = None, env: dict[str, str] | None = None,
            namespace: str = "default", check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run this version's ctr against this daemon.  `snapshotter` sets CONTAINERD_SNAPSHOTTER (ctr's
        `--snapshotter` default for `images pull`, `run`, `snapshots ...`).  Raises CtrError on failure if check."""
        extra = dict(env or {})
        if snapshotter is not None:
            extra["CONTAINERD_SNAPSHOTTER"] = snapshotter
        proc = self._run_ctr(list(args), extra, timeout, namespace=namespace, input=input)
        if check and proc.returncode != 0:
            raise CtrError([str(self.ctr_bin), *args], proc)
        return proc
