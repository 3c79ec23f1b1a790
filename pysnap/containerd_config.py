"""The containerd config.toml snippet that wires pysnap in, per containerd version."""
from __future__ import annotations

import glob
import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .report import Check, Status

SNAPSHOTTER_PLUGIN = "pysnap"
CONTENT_PLUGIN = "pysnap-content"  # never a built-in's name: containerd panics on duplicates
BUILTIN_CONTENT = "io.containerd.content.v1.content"
PARTS = ("snapshotter", "content", "nri")
VERSIONS = ("1.7", "2")


def host_platform() -> str:
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
    return f"linux/{arch.get(machine, machine)}"


def nri_settings(config: Config, nri_mode: str = "external") -> dict[str, Any]:
    """containerd's NRI keys pysnap needs: NRI on (off by default in 1.7), and for an external
    plugin the socket it dials when that is not containerd's default."""
    settings: dict[str, Any] = {"disable": False}
    if nri_mode != "preinstalled" and str(config.nri.socket) != DEFAULT_NRI_SOCKET:
        settings["socket_path"] = str(config.nri.socket)
    return settings


def containerd_snippet(version: str, config: Config, parts: tuple[str, ...] = PARTS,
                       nri_mode: str = "external") -> str:
    """config.toml lines for containerd ``version`` (``1.7`` or ``2``) wiring in ``parts``."""
    if version not in VERSIONS:
        raise ValueError(f"unsupported containerd version {version!r}; choose one of {', '.join(VERSIONS)}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    config_version = 2 if version == "1.7" else 3
    lines = [f"# pysnap for containerd {version}.x (config.toml version = {config_version})"]
    if "content" in parts:
        # pysnap must be the only content store: with the built-in still enabled 1.7 picks
        # one of the two at random per start and 2.x fails its metadata plugin.
        lines += [
            "# Top-level key: merge it into an existing disabled_plugins list instead of repeating it.",
            f'disabled_plugins = ["{BUILTIN_CONTENT}"]',
            "",
        ]
    if "snapshotter" in parts:
        snap = config.snapshotter
        lines += [
            f"[proxy_plugins.{SNAPSHOTTER_PLUGIN}]",
            '  type = "snapshot"',
            f"  address = {_quote(snap.address)}",
            f"  [proxy_plugins.{SNAPSHOTTER_PLUGIN}.exports]",
            f"    root = {_quote(snap.root)}",
            "",
        ]
    if "content" in parts:
        lines += [
            f'[proxy_plugins."{CONTENT_PLUGIN}"]',
            '  type = "content"',
            f"  address = {_quote(config.content.address)}",
            "",
        ]
    if version == "2" and "snapshotter" in parts:
        # containerd 2.x's transfer service (plain `ctr images pull`) unpacks only into
        # snapshotters listed here; the list replaces the built-in default, so keep overlayfs too.
        for snapshotter in ("overlayfs", SNAPSHOTTER_PLUGIN):
            lines += [
                '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
                f'  platform = "{host_platform()}"',
                f'  snapshotter = "{snapshotter}"',
                '  differ = "walking"',
                "",
            ]
    if "nri" in parts:
        lines.append(f'[plugins."{NRI_PLUGIN}"]')
        for key, value in nri_settings(config, nri_mode).items():
            lines.append(f"  {key} = {_quote(value) if isinstance(value, str) else str(value).lower()}")
    return "\n".join(lines).rstrip("\n") + "\n"


def _quote(path: Path | str) -> str:
    text = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


# -- reading and checking containerd's config (pysnap doctor) -------------------------------------------

DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
DEFAULT_CONTAINERD_ADDRESS = Path("/run/containerd/containerd.sock")
NRI_PLUGIN = "io.containerd.nri.v1.nri"
TRANSFER_PLUGIN = "io.containerd.transfer.v1.local"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
DEFAULT_NRI_SOCKET = "/var/run/nri/nri.sock"
DEFAULT_NRI_PLUGIN_PATH = "/opt/nri/plugins"


class ContainerdConfigError(ValueError):
    pass


@dataclass
class ContainerdConfig:
    """containerd's effective configuration: the main file merged with its ``imports``."""

    data: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    @property
    def version(self) -> int:
        value = self.data.get("version", 1)
        return value if isinstance(value, int) else 1

    def plugin(self, plugin_id: str) -> dict[str, Any]:
        section = (self.data.get("plugins") or {}).get(plugin_id) or {}
        return section if isinstance(section, dict) else {}

    def proxies(self, kind: str) -> dict[str, dict[str, Any]]:
        proxies = self.data.get("proxy_plugins") or {}
        return {name: p for name, p in proxies.items() if isinstance(p, dict) and p.get("type") == kind}

    @property
    def disabled_plugins(self) -> list[str]:
        return [str(p) for p in self.data.get("disabled_plugins") or []]

    @property
    def grpc_address(self) -> Path:
        return Path((self.data.get("grpc") or {}).get("address") or DEFAULT_CONTAINERD_ADDRESS)


def load_containerd_config(path: Path, major: int | None = None) -> ContainerdConfig:
    """Parse ``path`` and the files its ``imports`` name (relative to the importing file,
    glob patterns allowed), merged as containerd ``major`` merges them: 1.7 replaces a
    whole ``[plugins."…"]`` section from an import, 2.x merges its keys; both append
    lists such as ``disabled_plugins`` and replace ``[proxy_plugins.…]`` entries."""
    path = Path(path)
    data = _read_toml(path)
    if major is None:
        major = 2 if data.get("version") == 3 else 1
    merged = ContainerdConfig({}, [])
    _merge_file(merged, path, data, major, set())
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ContainerdConfigError(f"{path} does not exist") from None
    except OSError as exc:
        raise ContainerdConfigError(f"{path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ContainerdConfigError(f"{path}: invalid TOML: {exc}") from None


def _merge_file(into: ContainerdConfig, path: Path, data: dict[str, Any], major: int, seen: set[Path]) -> None:
    seen.add(path.resolve())
    into.files.append(path)
    _merge(into.data, data, major)
    for pattern in data.get("imports") or []:
        pattern = str(pattern)
        if not os.path.isabs(pattern):
            pattern = str(path.parent / pattern)
        for name in sorted(glob.glob(pattern)):
            imported = Path(name)
            if imported.resolve() in seen:
                continue
            _merge_file(into, imported, _read_toml(imported), major, seen)


def _merge(to: dict[str, Any], src: dict[str, Any], major: int) -> None:
    for key, value in src.items():
        if key == "imports":
            continue
        if key in ("proxy_plugins", "stream_processors") and isinstance(value, dict):
            to.setdefault(key, {}).update(value)
        elif key == "plugins" and isinstance(value, dict):
            plugins = to.setdefault("plugins", {})
            for name, section in value.items():
                if major >= 2 and isinstance(section, dict) and isinstance(plugins.get(name), dict):
                    _deep_merge(plugins[name], section)
                else:
                    plugins[name] = section
        elif isinstance(value, list) and isinstance(to.get(key), list) and all(isinstance(v, str) for v in value):
            to[key] = to[key] + [v for v in value if v not in to[key]]
        elif isinstance(value, dict) and isinstance(to.get(key), dict):
            _deep_merge(to[key], value)
        else:
            to[key] = value


def _deep_merge(to: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(to.get(key), dict):
            _deep_merge(to[key], value)
        else:
            to[key] = value


def expected_config_version(major: int) -> int:
    return 2 if major < 2 else 3


def _same_socket(a: str | Path, b: str | Path) -> bool:
    def norm(p: str | Path) -> str:
        text = os.path.normpath(str(p))
        return "/run/" + text[len("/var/run/"):] if text.startswith("/var/run/") else text
    return norm(a) == norm(b)


@dataclass
class Wiring:
    """What containerd's config says about pysnap, for the socket checks that follow."""

    snapshotter_plugin: str = ""
    content_wired: bool = False
    nri_enabled: bool = False
    nri_socket: str = DEFAULT_NRI_SOCKET


def check_containerd_config(ctd: ContainerdConfig, major: int, config: Config,
                            version_known: bool = True) -> tuple[list[Check], Wiring]:
    """Checks of containerd's effective config against pysnap's ``config`` for containerd
    ``major`` (1 for 1.7, 2 for 2.x)."""
    wiring = Wiring()
    checks = [_check_version(ctd, major, version_known)]
    checks.append(_check_snapshotter(ctd, major, config, wiring))
    checks.append(_check_content(ctd, major, config, wiring))
    if major >= 2:
        checks.append(_check_transfer(ctd, wiring))
    checks.append(_check_nri(ctd, major, config, wiring))
    return checks, wiring


def _check_version(ctd: ContainerdConfig, major: int, version_known: bool) -> Check:
    name = "containerd.config.version"
    found, wanted = ctd.version, expected_config_version(major)
    release = "1.7" if major < 2 else "2.x"
    shown = f"version = {found}" if "version" in ctd.data else "no version key (version 1)"
    if found == wanted:
        suffix = "" if version_known else f" (containerd's version unknown: assumed {release})"
        return Check(name, Status.OK, f"{shown}, as containerd {release} expects{suffix}")
    if major < 2 and found > 2:
        return Check(name, Status.FAIL, f"{shown}: containerd 1.7 refuses to start (unsupported config version)",
                     "set version = 2 at the top of the file; `pysnap config containerd --version 1.7` "
                     "prints the matching snippet")
    if major < 2:
        return Check(name, Status.FAIL, f"{shown}: containerd 1.7 reads sections named by full plugin ID, "
                     'such as [plugins."io.containerd.nri.v1.nri"], only in a version 2 config',
                     "convert the file to version 2 (`containerd config migrate` on 1.7, or rename "
                     '[plugins.cri] to [plugins."io.containerd.grpc.v1.cri"]) and set version = 2')
    return Check(name, Status.WARN, f"{shown}: containerd {release} converts it to version 3 at every start",
                 "run `containerd config migrate > config.toml.new`, review it and replace config.toml; "
                 "`pysnap config containerd --version 2` prints version 3 sections")


def _check_snapshotter(ctd: ContainerdConfig, major: int, config: Config, wiring: Wiring) -> Check:
    name = "containerd.config.snapshotter"
    snap = config.snapshotter
    version = "1.7" if major < 2 else "2"
    snippet = f"`pysnap config containerd --version {version} --plugins snapshotter`"
    proxies = ctd.proxies("snapshot")
    named = (ctd.data.get("proxy_plugins") or {}).get(SNAPSHOTTER_PLUGIN)
    if isinstance(named, dict) and named.get("type") != "snapshot":
        return Check(name, Status.FAIL, f'[proxy_plugins.{SNAPSHOTTER_PLUGIN}] has type = "{named.get("type")}"',
                     f'set type = "snapshot" there ({snippet} prints the section)')
    candidates = {n: p for n, p in proxies.items() if _same_socket(p.get("address", ""), snap.address)}
    if SNAPSHOTTER_PLUGIN in proxies:
        plugin_name, plugin = SNAPSHOTTER_PLUGIN, proxies[SNAPSHOTTER_PLUGIN]
    elif candidates:
        plugin_name, plugin = next(iter(sorted(candidates.items())))
    else:
        return Check(name, Status.FAIL, f"no [proxy_plugins.{SNAPSHOTTER_PLUGIN}]: containerd does not know pysnap",
                     f"add the section printed by {snippet} and restart containerd")
    wiring.snapshotter_plugin = plugin_name
    address = plugin.get("address", "")
    if not _same_socket(address, snap.address):
        return Check(name, Status.FAIL, f"[proxy_plugins.{plugin_name}] address = {address!r}, but the snapshotter "
                     f"listens on {str(snap.address)!r}",
                     f'set address = "{snap.address}" there (or [snapshotter] address in pysnap\'s config) '
                     "and restart containerd")
    notes = []
    status, advice = Status.OK, ""
    root = str((plugin.get("exports") or {}).get("root", ""))
    if not root or os.path.normpath(root) != os.path.normpath(str(snap.root)):
        status = Status.WARN
        notes.append(f"exports.root is {root!r}, not {str(snap.root)!r}: the kubelet can't account "
                     "pysnap's disk usage (image garbage collection, eviction)")
        advice = f'add root = "{snap.root}" under [proxy_plugins.{plugin_name}.exports]'
    if plugin_name != config.nri.snapshotter:
        status = Status.WARN
        notes.append(f"registered as {plugin_name!r} but the NRI plugin uses snapshotter "
                     f"{config.nri.snapshotter!r}")
        advice = (advice + "; " if advice else "") + f'rename it [proxy_plugins.{config.nri.snapshotter}] ' \
                 f'or set [nri] snapshotter = "{plugin_name}" in pysnap\'s config'
    message = f"[proxy_plugins.{plugin_name}] type snapshot, address {address}"
    return Check(name, status, message + ("; " + "; ".join(notes) if notes else ""), advice)


def _check_content(ctd: ContainerdConfig, major: int, config: Config, wiring: Wiring) -> Check:
    name = "containerd.config.content"
    address = config.content.address
    proxies = ctd.proxies("content")
    ours = {n: p for n, p in proxies.items() if _same_socket(p.get("address", ""), address)}
    others = {n: p for n, p in proxies.items() if n not in ours}
    builtin_disabled = BUILTIN_CONTENT in ctd.disabled_plugins
    version = "1.7" if major < 2 else "2"
    if others:
        other, plugin = next(iter(sorted(others.items())))
        return Check(name, Status.FAIL, f"content proxy [proxy_plugins.{other}] dials {plugin.get('address')!r}, "
                     f"but pysnap's content store listens on {str(address)!r}",
                     "point it at pysnap's content socket (or remove it) and restart containerd")
    if not ours:
        if builtin_disabled:
            return Check(name, Status.FAIL, f"{BUILTIN_CONTENT} is disabled but no content proxy is configured: "
                         "containerd has no content store",
                         f"add the [proxy_plugins.\"{CONTENT_PLUGIN}\"] section printed by `pysnap config "
                         f"containerd --version {version}`, or re-enable the built-in store")
        return Check(name, Status.OK, "containerd uses its built-in content store (pysnap's is not wired in)")
    wiring.content_wired = True
    plugin_name = next(iter(sorted(ours)))
    if plugin_name == "content":
        return Check(name, Status.FAIL, "the content proxy is named 'content', the built-in store's name: "
                     "containerd panics on the duplicate", f'rename it [proxy_plugins."{CONTENT_PLUGIN}"]')
    if not builtin_disabled:
        effect = "1.7 picks one of the two, unpredictably" if major < 2 else "2.x fails to start its metadata plugin"
        return Check(name, Status.FAIL, f"[proxy_plugins.\"{plugin_name}\"] is wired but the built-in content "
                     f"store is still enabled: containerd {effect}",
                     f'add "{BUILTIN_CONTENT}" to the top-level disabled_plugins list and restart containerd')
    return Check(name, Status.OK, f"[proxy_plugins.\"{plugin_name}\"] type content, address {address}; "
                 f"{BUILTIN_CONTENT} disabled")


def _check_transfer(ctd: ContainerdConfig, wiring: Wiring) -> Check:
    name = "containerd.config.transfer"
    snapshotter = wiring.snapshotter_plugin or SNAPSHOTTER_PLUGIN
    entries = [e for e in ctd.plugin(TRANSFER_PLUGIN).get("unpack_config") or [] if isinstance(e, dict)]
    ours = [e for e in entries if e.get("snapshotter") == snapshotter]
    platform = host_platform()
    advice = (f'add [[plugins."{TRANSFER_PLUGIN}".unpack_config]] entries for "{snapshotter}" and "overlayfs" '
              f'with platform = "{platform}" (`pysnap config containerd --version 2` prints them)')
    if not ours:
        return Check(name, Status.FAIL, f"the transfer service's unpack_config does not list {snapshotter!r}: "
                     "pulls through it (ctr images pull, CRI) can't unpack into pysnap", advice)
    if not any(str(e.get("platform", "")).startswith(platform) for e in ours):
        return Check(name, Status.FAIL, f"unpack_config lists {snapshotter!r} only for "
                     f"{', '.join(sorted({str(e.get('platform')) for e in ours}))}, not this host's {platform}",
                     advice)
    if not any(e.get("snapshotter") == "overlayfs" for e in entries):
        return Check(name, Status.WARN, f"unpack_config lists {snapshotter!r} but not overlayfs: the list replaces "
                     "the default, so pulls into overlayfs can no longer unpack", advice)
    return Check(name, Status.OK, f"the transfer service unpacks into {snapshotter!r}")


def _check_nri(ctd: ContainerdConfig, major: int, config: Config, wiring: Wiring) -> Check:
    name = "containerd.config.nri"
    section = ctd.plugin(NRI_PLUGIN)
    header = f'[plugins."{NRI_PLUGIN}"]'
    default_disabled = major < 2
    disabled = section.get("disable", default_disabled)
    socket_path = str(section.get("socket_path") or DEFAULT_NRI_SOCKET)
    wiring.nri_socket = socket_path
    if CRI_PLUGIN in ctd.disabled_plugins:
        return Check(name, Status.FAIL, f"{CRI_PLUGIN} is disabled: NRI only runs inside the CRI plugin",
                     f'remove "{CRI_PLUGIN}" from disabled_plugins and restart containerd')
    if disabled:
        why = "disable = true" if "disable" in section else "NRI is off by default in containerd 1.7"
        return Check(name, Status.FAIL, f"NRI is disabled ({why}): the pysnap NRI plugin can't connect",
                     f"add disable = false under {header} and restart containerd")
    wiring.nri_enabled = True
    plugin_path = Path(str(section.get("plugin_path") or DEFAULT_NRI_PLUGIN_PATH))
    launcher = plugin_path / f"{config.nri.plugin_index}-{config.nri.plugin_name}"
    if section.get("disable_connections"):
        if launcher.is_file():
            return Check(name, Status.OK, f"NRI enabled for pre-installed plugins only; pysnap's is {launcher}")
        return Check(name, Status.FAIL, "disable_connections = true: containerd accepts no external NRI plugin, "
                     f"and there is no pre-installed {launcher}",
                     f"set disable_connections = false under {header}, or `pysnap install --nri-mode preinstalled`")
    if not _same_socket(socket_path, config.nri.socket):
        return Check(name, Status.FAIL, f"containerd's NRI socket is {socket_path} but the pysnap NRI plugin "
                     f"dials {config.nri.socket}",
                     f'set socket_path = "{config.nri.socket}" under {header}, or [nri] socket = '
                     f'"{socket_path}" in pysnap\'s config')
    return Check(name, Status.OK, f"NRI enabled, socket {socket_path}")
