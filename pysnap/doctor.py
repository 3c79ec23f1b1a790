"""``pysnap doctor``: is this node able to run pysnap, and is containerd wired to it?

Each check is one ``Check`` (OK / WARN / FAIL with what to do).  Nothing here
changes anything: files are read, sockets connected to, daemons asked for
their gRPC health.  The host's kernel interfaces are taken from ``HOST`` so
that tests can point them at fakes.
"""
from __future__ import annotations

import grp
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snapshotter.kernel import (
    OVERLAY_PARAMETERS, OverlayFeatures, _in_user_namespace, _kernel_version, filesystem_type,
    overlay_parameters, supports_d_type,
)

from .config import Config
from .containerd_config import (
    ContainerdConfig, ContainerdConfigError, Wiring, check_containerd_config, load_containerd_config,
)
from .daemons import metrics_address
from .probes import containerd_version_via_socket, grpc_health, http_get, probe_socket
from .report import Check, Status

SERVICES = {"snapshotter": "containerd.services.snapshots.v1.Snapshots",
            "content": "containerd.services.content.v1.Content"}
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "9p", "ceph")


@dataclass(frozen=True)
class Host:
    """Where the kernel's answers are read from."""

    proc_filesystems: Path = Path("/proc/filesystems")
    overlay_parameters: Path = OVERLAY_PARAMETERS
    in_user_namespace: bool | None = None  # None: look at /proc/self/uid_map
    kernel: tuple[int, int] | None = None  # None: uname


HOST = Host()


def run_checks(config: Config, containerd_config: Path, host: Host | None = None) -> list[Check]:
    host = host or HOST
    checks = kernel_checks(config, host)
    checks += root_checks(config)
    # containerd's version decides how its config is read; its socket address comes from the config.
    main_address = _grpc_address_hint(containerd_config, config)
    version_check, version = containerd_version_check(main_address)
    checks.append(version_check)
    ctd: ContainerdConfig | None = None
    try:
        ctd = load_containerd_config(containerd_config, version[0] if version else None)
        imports = len(ctd.files) - 1
        checks.append(Check("containerd.config", Status.OK, f"read {containerd_config}"
                            + (f" and {imports} imported file{'s' if imports != 1 else ''}" if imports else "")))
    except ContainerdConfigError as exc:
        missing = not Path(containerd_config).exists()
        advice = ("write it with `pysnap install`, or by hand: `(echo 'version = 3'; pysnap config containerd "
                  f"--version 2) > {containerd_config}` (`version = 2` and --version 1.7 for containerd 1.7), "
                  "or point --containerd-config at the file containerd uses"
                  if missing else "fix the file (containerd refuses to start with it)")
        checks.append(Check("containerd.config", Status.FAIL,
                            f"{exc}" + (": containerd runs with its defaults, without pysnap" if missing else ""),
                            advice))
    wiring = Wiring()
    if ctd is not None:
        major = version[0] if version else (2 if ctd.version >= 3 else 1)
        config_checks, wiring = check_containerd_config(ctd, major, config, version_known=version is not None)
        checks += config_checks
    else:
        wiring.content_wired = probe_socket(config.content.address).exists
    checks += daemon_checks(config, wiring, nri_known=ctd is not None)
    return checks


# -- kernel ---------------------------------------------------------------------------------------------

def kernel_checks(config: Config, host: Host) -> list[Check]:
    checks = []
    try:
        filesystems = host.proc_filesystems.read_text().split()
    except OSError:
        filesystems = []
    params = overlay_parameters(host.overlay_parameters)
    in_userns = _in_user_namespace() if host.in_user_namespace is None else host.in_user_namespace
    kernel = _kernel_version() if host.kernel is None else host.kernel
    features = OverlayFeatures(has_index_parameter="index" in params, in_user_namespace=in_userns, kernel=kernel)
    configured = list(config.snapshotter.mount_options)
    root = _existing(config.snapshotter.root)
    on_tmpfs = filesystem_type(root) == "tmpfs"
    options = features.overlay_options(configured, on_tmpfs)
    if "overlay" not in filesystems:
        checks.append(Check("kernel.overlay", Status.FAIL, "the kernel has no overlay filesystem "
                            f"(not in {host.proc_filesystems})",
                            "`modprobe overlay`, and list overlay in /etc/modules-load.d/pysnap.conf so it "
                            "loads at boot"))
    else:
        checks.append(Check("kernel.overlay", Status.OK, "overlay filesystem available; pysnap mounts with "
                            + (",".join(options) if options else "no extra options")))
    checks.append(_index_check(params, configured))
    checks.append(_flag_check(
        "redirect_dir", params, configured,
        "directory renames in containers are stored as redirect xattrs in the upper directory; "
        "tools reading upper directories directly see incomplete layers, and crafted layer xattrs "
        "are followed", "redirect_dir=off"))
    checks.append(_flag_check(
        "metacopy", params, configured,
        "chmod/chown in containers copy up metadata only, leaving upper directories that depend on "
        "their lower layers; the kernel documentation warns against metacopy with untrusted layers",
        "metacopy=off"))
    checks.append(_userxattr_check(features, on_tmpfs, kernel))
    return checks


def _mount_option(configured: list[str], name: str) -> str | None:
    for option in reversed(configured):
        key, _, value = option.partition("=")
        if key == name:
            return value or "on"
    return None


def _index_check(params: dict[str, str], configured: list[str]) -> Check:
    name = "kernel.overlay.index"
    if _mount_option(configured, "index") == "on" and "index" not in configured:
        return Check(name, Status.WARN, "index=on in [snapshotter] mount_options: a layer shared by two "
                     "containers fails to mount (EBUSY)", "remove index=on from mount_options")
    if "index" not in params:
        return Check(name, Status.OK, "the overlay module has no index parameter: no inode index")
    return Check(name, Status.OK, f"module default index={params['index']}; pysnap mounts with index=off, "
                 "as containerd does (layers are shared between mounts)")


def _flag_check(option: str, params: dict[str, str], configured: list[str], risk: str, fix: str) -> Check:
    name = f"kernel.overlay.{option}"
    mounted = _mount_option(configured, option)
    module = params.get(option)
    if mounted is not None:
        if mounted in ("off", "nofollow", "follow"):
            return Check(name, Status.OK, f"{option}={mounted} in [snapshotter] mount_options")
        return Check(name, Status.WARN, f"{option}={mounted} in [snapshotter] mount_options: {risk}",
                     f"remove it from mount_options (or use {fix})")
    if module is None:
        return Check(name, Status.OK, f"the overlay module has no {option} parameter (feature off)")
    if module.upper() in ("Y", "1", "ON"):
        return Check(name, Status.WARN, f"the overlay module enables {option} by default: {risk}",
                     f'add "{fix}" to [snapshotter] mount_options in pysnap\'s config, or set '
                     f"`options overlay {option}=N` in /etc/modprobe.d/")
    return Check(name, Status.OK, f"{option}={module} (module default)")


def _userxattr_check(features: OverlayFeatures, on_tmpfs: bool, kernel: tuple[int, int]) -> Check:
    name = "kernel.overlay.userxattr"
    if not features.in_user_namespace:
        return Check(name, Status.OK, "not in a user namespace: overlay uses trusted.* xattrs, no userxattr needed")
    if on_tmpfs:
        return Check(name, Status.OK, "in a user namespace, snapshotter root on tmpfs: no userxattr needed")
    if kernel < (5, 11):
        return Check(name, Status.FAIL, f"in a user namespace on Linux {kernel[0]}.{kernel[1]}: overlay needs "
                     "the userxattr option, which arrived in Linux 5.11",
                     "run pysnap in the host's user namespace, or on Linux 5.11 or later")
    return Check(name, Status.OK, "in a user namespace: pysnap mounts overlays with userxattr")


# -- roots ----------------------------------------------------------------------------------------------

def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def root_checks(config: Config) -> list[Check]:
    checks = []
    for daemon, root in (("snapshotter", config.snapshotter.root), ("content", config.content.root)):
        name = f"root.{daemon}"
        existing = _existing(root)
        where = str(root) if existing == Path(root) else f"{existing} (holding {root}, which does not exist yet)"
        fstype = filesystem_type(existing) or "an unknown filesystem"
        try:
            d_type = supports_d_type(existing)
        except OSError as exc:
            checks.append(Check(name, Status.WARN, f"can't read {existing}: {exc.strerror or exc}",
                                "run pysnap doctor as root"))
            continue
        if daemon == "content":
            checks.append(Check(name, Status.OK, f"{where} is on {fstype}"))
            continue
        if fstype in ("overlay", "aufs"):
            checks.append(Check(name, Status.FAIL, f"{where} is on {fstype}: overlayfs can't use directories "
                                "on an overlay as upper or work directories",
                                "put [snapshotter] root on ext4, xfs or btrfs (in a container: on a volume)"))
        elif d_type is False:
            checks.append(Check(name, Status.FAIL, f"{where} is on {fstype} without d_type support: overlayfs "
                                "needs it (xfs made with ftype=0?)",
                                "move [snapshotter] root to a filesystem with d_type (xfs: mkfs.xfs -n ftype=1)"))
        elif fstype.split(".")[0] in NETWORK_FILESYSTEMS or fstype.startswith("fuse"):
            checks.append(Check(name, Status.WARN, f"{where} is on {fstype}: overlayfs upper directories on "
                                "it are unsupported or unreliable", "put [snapshotter] root on a local disk"))
        elif d_type is None:
            checks.append(Check(name, Status.WARN, f"{where} is on {fstype}; d_type support not checked "
                                "(empty directory)", ""))
        else:
            checks.append(Check(name, Status.OK, f"{where} is on {fstype}, with d_type"))
    return checks


# -- containerd -----------------------------------------------------------------------------------------

VERSION = re.compile(r"(?<![\w.])v?(\d+)\.(\d+)\.(\d+)")


def parse_containerd_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from ``containerd --version`` output or the Version API's string."""
    fields = text.split()
    # "containerd <module path> <version> <revision>": the module path may end in /v2.
    for field in fields[2:3] + fields:
        match = VERSION.match(field)
        if match:
            return int(match[1]), int(match[2]), int(match[3])
    return None


def containerd_version_check(address: Path) -> tuple[Check, tuple[int, int, int] | None]:
    name = "containerd.version"
    text, source = "", ""
    binary = shutil.which("containerd")
    if binary:
        try:
            result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
            text, source = result.stdout.strip(), binary
        except (OSError, subprocess.SubprocessError) as exc:
            text, source = "", f"{binary} ({exc})"
    if not text:
        answered = containerd_version_via_socket(address)
        if answered:
            text, source = f"containerd - {answered}", str(address)
    version = parse_containerd_version(text) if text else None
    if version is None:
        where = f"{source} printed {text!r}" if text else (
            f"no containerd on PATH and nothing answers on {address}")
        return Check(name, Status.WARN, f"containerd's version unknown: {where}",
                     "install containerd 1.7 or 2.x (or put it on PATH); the checks below assume the "
                     "version the config file is written for"), None
    shown = ".".join(map(str, version))
    if version[0] < 1 or (version[0] == 1 and version[1] < 7):
        return Check(name, Status.FAIL, f"containerd {shown}: pysnap needs containerd 1.7 or 2.x",
                     "upgrade containerd"), version
    if version[:2] == (1, 7) and version[2] < 16:
        return Check(name, Status.WARN, f"containerd {shown}: before 1.7.16 the kubelet mis-accounts the disk "
                     "usage of proxy snapshotters", "upgrade to containerd 1.7.16 or later"), version
    if version[0] > 2:
        return Check(name, Status.WARN, f"containerd {shown}: newer than pysnap was tested with (1.7, 2.x)",
                     "check pysnap's release notes"), version
    return Check(name, Status.OK, f"containerd {shown} (from {source})"), version


def _grpc_address_hint(path: Path, config: Config) -> Path:
    """containerd's socket as its main config file sets it (imports aside), else pysnap's setting."""
    try:
        ctd = load_containerd_config(path, 1)
    except ContainerdConfigError:
        return config.nri.containerd_address
    return ctd.grpc_address if "address" in (ctd.data.get("grpc") or {}) else config.nri.containerd_address


# -- daemons --------------------------------------------------------------------------------------------

def daemon_checks(config: Config, wiring: Wiring, nri_known: bool) -> list[Check]:
    checks = []
    for daemon, section, needed in (("snapshotter", config.snapshotter, True),
                                    ("content", config.content, wiring.content_wired)):
        socket_check = _socket_check(daemon, section.address, section.socket_group, needed)
        checks.append(socket_check)
        if socket_check.status is not Status.FAIL and probe_socket(section.address).accepts:
            checks.append(_health_check(daemon, section.address))
    if nri_known and wiring.nri_enabled:
        state = probe_socket(Path(wiring.nri_socket))
        if state.accepts:
            checks.append(Check("socket.nri", Status.OK, f"containerd's NRI socket {wiring.nri_socket} accepts "
                                "connections"))
        else:
            checks.append(Check("socket.nri", Status.WARN, f"containerd's NRI socket {wiring.nri_socket} "
                                f"{'is missing' if not state.exists else 'refuses connections'}: containerd is "
                                "not running, or NRI did not start (it starts with the CRI plugin)",
                                "start containerd; `journalctl -u containerd | grep -i nri` tells why NRI is off"))
    checks.append(_nri_plugin_check(config))
    return checks


def _unit(daemon: str) -> str:
    return f"pysnap-{daemon}.service"


def _socket_check(daemon: str, path: Path, socket_group: str, needed: bool) -> Check:
    name = f"socket.{daemon}"
    state = probe_socket(path)
    start = f"`systemctl start {_unit(daemon)}` (or `pysnap serve {daemon}`)"
    if not state.exists:
        if not needed:
            return Check(name, Status.OK, f"{path} absent; containerd does not use pysnap's {daemon} store")
        return Check(name, Status.FAIL, f"{path} is missing: the pysnap {daemon} daemon is not running, and "
                     "containerd's calls to it fail", f"{start}; containerd needs it before it starts")
    if not state.is_socket:
        return Check(name, Status.FAIL, f"{path} exists but is not a socket ({state.error})",
                     f"move it away, then {start}")
    if not state.accepts:
        return Check(name, Status.FAIL, f"{path} refuses connections ({state.error}): a stale socket, the daemon "
                     "is gone", f"`systemctl restart {_unit(daemon)}`; `journalctl -u {_unit(daemon)}` says why "
                     "it stopped")
    if state.mode & 0o007:
        return Check(name, Status.FAIL, f"{path} has mode {state.mode:04o}: any local user can drive the {daemon} "
                     "daemon, which acts as root", f"`chmod 0660 {path}` (the daemon creates it 0660: find what "
                     "changed it)")
    if state.uid != 0:
        return Check(name, Status.FAIL, f"{path} is owned by uid {state.uid}, not root",
                     f"run the daemon as root, as {_unit(daemon)} does")
    group = _group_name(state.gid)
    if socket_group and group != socket_group:
        return Check(name, Status.WARN, f"{path} belongs to group {group}, not socket_group {socket_group!r}",
                     f"`systemctl restart {_unit(daemon)}` (it sets the group at start)")
    return Check(name, Status.OK, f"{path} accepts connections, mode {state.mode:04o}, owner root:{group}")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _health_check(daemon: str, path: Path) -> Check:
    name = f"health.{daemon}"
    overall = grpc_health(path)
    status = grpc_health(path, SERVICES[daemon]) if overall == "SERVING" else overall
    if status == "SERVING":
        return Check(name, Status.OK, f"gRPC health: {SERVICES[daemon]} SERVING")
    if status == "UNIMPLEMENTED":
        return Check(name, Status.WARN, "no gRPC health service on the socket: is it an older pysnap?",
                     "upgrade pysnap")
    if status == "DEADLINE_EXCEEDED":
        return Check(name, Status.FAIL, "no answer to a health check within 3 s: the daemon is wedged, and so are "
                     "containerd's calls to it", f"`systemctl restart {_unit(daemon)}`; `journalctl -u "
                     f"{_unit(daemon)}` shows what it was doing")
    return Check(name, Status.FAIL, f"gRPC health: {status}", f"`systemctl restart {_unit(daemon)}`")


def _nri_plugin_check(config: Config) -> Check:
    name = "daemon.nri"
    address = metrics_address(config, "nri")
    if not address:
        return Check(name, Status.OK, "not checked: the NRI plugin's metrics endpoint is off")
    status, body = http_get(address, "/healthz")
    if status == 200:
        return Check(name, Status.OK, f"the pysnap NRI plugin answers on {address} (healthy)")
    if status == 0:
        return Check(name, Status.WARN, f"the pysnap NRI plugin does not answer on {address} ({body}): "
                     "image volumes are not mounted into containers",
                     f"if you use image volumes: `systemctl start {_unit('nri')}` (pre-installed in "
                     "/opt/nri/plugins: restart containerd, which launches it)")
    return Check(name, Status.FAIL, f"the pysnap NRI plugin reports {status} on {address}/healthz",
                 f"`systemctl restart {_unit('nri')}`; `journalctl -u {_unit('nri')}` says what is stuck")


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0

