"""Specification of ``pysnap serve snapshotter`` as a process (the console script in .venv)."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from pysnap._pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
PYSNAP = REPO / ".venv" / "bin" / "pysnap"
START_TIMEOUT = 20.0


class Daemon:
    def __init__(self, proc: subprocess.Popen, address: Path, log: Path) -> None:
        self.proc = proc
        self.address = address
        self.log = log

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            if accepts_connections(self.address):
                return
            time.sleep(0.02)
        raise AssertionError(f"daemon not serving on {self.address} after {START_TIMEOUT}s:\n{self.stderr()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout)

    def stub(self) -> tuple[grpc.Channel, pb_grpc.SnapshotsStub]:
        channel = grpc.insecure_channel(
            f"unix://{self.address}",
            options=[("grpc.max_send_message_length", 32 << 20), ("grpc.max_receive_message_length", 32 << 20)],
        )
        return channel, pb_grpc.SnapshotsStub(channel)


def accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


@pytest.fixture
def paths(tmp_path: Path, short_tmp: Path) -> dict[str, Path]:
    config = tmp_path / "config.toml"
    config.write_text("")
    return {"root": tmp_path / "root", "address": short_tmp / "snap.sock", "config": config, "tmp": tmp_path}


@pytest.fixture
def launch(paths) -> Iterator:
    started: list[Daemon] = []

    def start(*extra: str, env: dict[str, str] | None = None, config: Path | None = None,
              root: Path | bool | None = None, address: Path | bool | None = None) -> Daemon:
        log = paths["tmp"] / f"daemon-{len(started)}.log"
        args = [str(PYSNAP), "--config", str(config or paths["config"]), "serve", "snapshotter"]
        if root is not False:
            args += ["--root", str(root or paths["root"])]
        if address is not False:
            args += ["--address", str(address or paths["address"])]
        with open(log, "w") as stderr:
            proc = subprocess.Popen(
                args + list(extra), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                env={**os.environ, **(env or {})},
            )
        daemon = Daemon(proc, Path(address or paths["address"]), log)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


@contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(START_TIMEOUT)
    try:
        yield sock
    finally:
        sock.close()


# =========================================================================== serving


def test_the_daemon_serves_the_snapshots_api_on_the_socket(launch, paths):
    daemon = launch()
    daemon.wait_serving()
    channel, stub = daemon.stub()
    with channel:
        [mount] = stub.Prepare(pb.PrepareSnapshotRequest(key="a")).mounts
        assert (mount.type, mount.source) == ("bind", str(paths["root"] / "snapshots" / "1" / "fs"))
        assert stub.Stat(pb.StatSnapshotRequest(key="a")).info.kind == pb.ACTIVE
    assert daemon.stop() == 0


def test_the_socket_is_a_socket_with_mode_0660(launch, paths):
    daemon = launch()
    daemon.wait_serving()
    st = os.lstat(paths["address"])
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    daemon.stop()


def test_the_root_is_created_with_mode_0700(launch, paths):
    daemon = launch()
    daemon.wait_serving()
    assert stat.S_IMODE(os.lstat(paths["root"]).st_mode) == 0o700
    assert (paths["root"] / "metadata.db").is_file()
    daemon.stop()


def test_missing_parent_directories_of_the_socket_are_created(launch, paths, short_tmp):
    address = short_tmp / "a" / "b" / "s.sock"
    daemon = launch(address=address)
    daemon.wait_serving()
    daemon.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_exits_0_and_removes_the_socket(launch, paths, signum):
    daemon = launch()
    daemon.wait_serving()
    assert daemon.stop(signum) == 0, daemon.stderr()
    assert not os.path.lexists(paths["address"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_sent_as_soon_as_the_socket_appears_still_exits_0(launch, paths, signum):
    daemon = launch()
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.lexists(paths["address"]):
        assert daemon.proc.poll() is None, daemon.stderr()
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    assert daemon.stop(signum) == 0, daemon.stderr()
    assert not os.path.lexists(paths["address"])


def test_snapshots_survive_a_restart_of_the_daemon(launch, paths):
    first = launch()
    first.wait_serving()
    channel, stub = first.stub()
    with channel:
        stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"x": "1"}))
        stub.Commit(pb.CommitSnapshotRequest(name="c", key="a"))
    assert first.stop() == 0

    second = launch()
    second.wait_serving()
    channel, stub = second.stub()
    with channel:
        info = stub.Stat(pb.StatSnapshotRequest(key="c")).info
        assert (info.name, info.kind) == ("c", pb.COMMITTED)
    assert second.stop() == 0


def test_messages_larger_than_grpcs_4_mib_default_are_accepted(launch):
    daemon = launch()
    daemon.wait_serving()
    labels = {f"label-{i:05d}": "v" * 4000 for i in range(2000)}  # ~8 MiB
    channel, stub = daemon.stub()
    with channel:
        stub.Prepare(pb.PrepareSnapshotRequest(key="big", labels=labels))
        assert len(stub.Stat(pb.StatSnapshotRequest(key="big")).info.labels) == 2000
    daemon.stop()


# =========================================================================== systemd notification


def test_notify_socket_receives_ready_once_the_socket_accepts_connections(launch, paths, short_tmp):
    with notify_socket(short_tmp / "notify") as notify:
        daemon = launch(env={"NOTIFY_SOCKET": str(short_tmp / "notify")})
        assert notify.recv(4096) == b"READY=1"
        assert accepts_connections(paths["address"])
        daemon.stop()
        assert notify.recv(4096) == b"STOPPING=1"
    assert daemon.proc.returncode == 0


def test_an_unreachable_notify_socket_does_not_stop_the_daemon(launch, short_tmp):
    daemon = launch(env={"NOTIFY_SOCKET": str(short_tmp / "nobody-listens")})
    daemon.wait_serving()
    assert daemon.stop() == 0


# =========================================================================== the socket path


def test_a_stale_socket_file_is_replaced(launch, paths):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(paths["address"]))
    stale.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(os.lstat(paths["address"]).st_mode)
    daemon = launch()
    daemon.wait_serving()
    channel, stub = daemon.stub()
    with channel:
        stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    assert daemon.stop() == 0


def test_a_socket_someone_listens_on_is_refused_and_left_alone(launch, paths):
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(paths["address"]))
    live.listen()
    try:
        daemon = launch()
        returncode = daemon.proc.wait(START_TIMEOUT)
        assert returncode != 0
        assert "in use" in daemon.stderr()
        assert accepts_connections(paths["address"])
    finally:
        live.close()


def test_a_file_that_is_not_a_socket_at_the_address_is_refused(launch, paths):
    paths["address"].write_text("precious")
    daemon = launch()
    assert daemon.proc.wait(START_TIMEOUT) != 0
    assert "not a socket" in daemon.stderr()
    assert paths["address"].read_text() == "precious"


# =========================================================================== configuration


def test_an_unknown_key_in_the_config_file_exits_2_naming_the_key(launch, paths):
    config = paths["tmp"] / "bad.toml"
    config.write_text("[snapshotter]\nmount_option = ['volatile']\n")
    daemon = launch(config=config)
    assert daemon.proc.wait(START_TIMEOUT) == 2
    assert "mount_option" in daemon.stderr()
    assert not os.path.lexists(paths["address"])


def test_a_value_of_the_wrong_type_exits_2_naming_the_key(launch, paths):
    config = paths["tmp"] / "bad.toml"
    config.write_text("[snapshotter]\nupperdir_label = 'yes'\n")
    daemon = launch(config=config)
    assert daemon.proc.wait(START_TIMEOUT) == 2
    assert "snapshotter.upperdir_label" in daemon.stderr()


def test_a_config_file_that_is_not_toml_exits_2(launch, paths):
    config = paths["tmp"] / "bad.toml"
    config.write_text("[snapshotter\n")
    daemon = launch(config=config)
    assert daemon.proc.wait(START_TIMEOUT) == 2
    assert "configuration error" in daemon.stderr()


def test_a_missing_explicit_config_file_exits_2(launch, paths):
    daemon = launch(config=paths["tmp"] / "absent.toml")
    assert daemon.proc.wait(START_TIMEOUT) == 2
    assert "absent.toml" in daemon.stderr()


def test_the_config_file_sets_root_address_and_mount_options(launch, paths, short_tmp):
    config = paths["tmp"] / "good.toml"
    root, address = paths["tmp"] / "configured-root", short_tmp / "configured.sock"
    config.write_text(
        f'[snapshotter]\nroot = "{root}"\naddress = "{address}"\nmount_options = ["volatile"]\nupperdir_label = true\n'
    )
    daemon = launch(config=config, root=False, address=False)
    daemon.address = address
    daemon.wait_serving()
    channel, stub = daemon.stub()
    with channel:
        stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
        stub.Commit(pb.CommitSnapshotRequest(name="c", key="a"))
        [mount] = stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="c")).mounts
        assert "volatile" in mount.options
        info = stub.Stat(pb.StatSnapshotRequest(key="c")).info
        assert info.labels["containerd.io/snapshot/overlay.upperdir"] == str(root / "snapshots" / "1" / "fs")
    assert daemon.stop() == 0


def test_command_line_root_and_address_override_the_config_file(launch, paths, short_tmp):
    config = paths["tmp"] / "good.toml"
    config.write_text(f'[snapshotter]\nroot = "{paths["tmp"] / "unused"}"\naddress = "{short_tmp / "unused.sock"}"\n')
    daemon = launch(config=config)
    daemon.wait_serving()
    assert (paths["root"] / "metadata.db").is_file()
    assert not (paths["tmp"] / "unused").exists()
    assert not (short_tmp / "unused.sock").exists()
    daemon.stop()
