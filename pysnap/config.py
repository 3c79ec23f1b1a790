"""The one configuration model of pysnap (``/etc/pysnap/config.toml``).

Each daemon has a section; every key is a dataclass field with a default and a
one-line description.  Loading validates strictly: an unknown key or a value of
the wrong type stops the daemon with a message naming it.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_CONFIG_PATH = Path("/etc/pysnap/config.toml")


class ConfigError(ValueError):
    pass


def _doc(text: str, check: Callable[[Any], str | None] | None = None, **kwargs: Any) -> Any:
    """A config key: its one-line description, and optionally a check returning
    what is wrong with a value (or None)."""
    return field(metadata={"doc": text, "check": check}, **kwargs)


def _metrics_endpoint(value: str) -> str | None:
    if value in ("", "off"):
        return None
    from .metrics import parse_endpoint

    try:
        parse_endpoint(value)
    except ValueError as exc:
        return str(exc)
    return None


def _metrics_field(default_endpoint: str) -> Any:
    """The ``metrics_address`` key every daemon has; empty means ``default_endpoint``."""
    return _doc("Prometheus endpoint: 127.0.0.1:PORT, unix:/path, or off. Empty: a unix socket beside the "
                f"daemon's own ({default_endpoint}).", _metrics_endpoint, default="")


def _two_digits(value: str) -> str | None:
    return None if len(value) == 2 and value.isdigit() else "expected two digits, e.g. \"10\""


def _absolute_paths(values: tuple[str, ...]) -> str | None:
    bad = [v for v in values if not v.startswith("/")]
    return f"expected absolute paths, got {bad}" if bad else None


@dataclass(frozen=True)
class SnapshotterConfig:
    root: Path = _doc("Directory holding snapshots and metadata.db.", default=Path("/var/lib/pysnap/snapshotter"))
    address: Path = _doc("Unix socket containerd dials ([proxy_plugins.pysnap] address).",
                         default=Path("/run/pysnap/snapshotter.sock"))
    mount_options: tuple[str, ...] = _doc("Extra overlay options appended to every overlay mount.", default=())
    upperdir_label: bool = _doc("Add containerd.io/snapshot/overlay.upperdir to Stat/List/Update results.",
                                default=False)
    durable_metadata: bool = _doc("fsync metadata.db on every change (SQLite synchronous=FULL).", default=True)
    workers: int = _doc("Threads doing disk work for RPCs.", default=8)
    socket_group: str = _doc("Group owning the socket (mode 0660); empty keeps root's group.", default="")
    metrics_address: str = _metrics_field("/run/pysnap/snapshotter-metrics.sock")


@dataclass(frozen=True)
class ContentConfig:
    root: Path = _doc("Directory holding blobs/, ingest/ and metadata.db.", default=Path("/var/lib/pysnap/content"))
    address: Path = _doc("Unix socket containerd dials ([proxy_plugins.pysnap-content] address).",
                         default=Path("/run/pysnap/content.sock"))
    durable_metadata: bool = _doc("fsync metadata.db on every change (SQLite synchronous=FULL).", default=True)
    workers: int = _doc("Threads doing disk work for RPCs.", default=8)
    socket_group: str = _doc("Group owning the socket (mode 0660); empty keeps root's group.", default="")
    lock_wait_ms: int = _doc("How long a writer waits for a ref held by another writer before UNAVAILABLE.",
                             default=1000)
    metrics_address: str = _metrics_field("/run/pysnap/content-metrics.sock")


@dataclass(frozen=True)
class NriConfig:
    socket: Path = _doc("NRI socket of the runtime (external plugin mode).", default=Path("/var/run/nri/nri.sock"))
    containerd_address: Path = _doc("containerd's gRPC socket, used to resolve and unpack images.",
                                    default=Path("/run/containerd/containerd.sock"))
    plugin_name: str = _doc("Name the plugin registers with.", default="pysnap")
    plugin_index: str = _doc("Two-digit NRI plugin index (order among plugins).", _two_digits, default="10")
    snapshotter: str = _doc("containerd snapshotter that volumes are created in.", default="pysnap")
    mount_root: Path = _doc("Where volume snapshots are mounted on the host.", default=Path("/run/pysnap/nri"))
    namespaces: tuple[str, ...] = _doc("containerd namespaces whose containers may get volumes.",
                                       default=("k8s.io",))
    allowed_images: tuple[str, ...] = _doc("Image references allowed as volumes (shell-style patterns).",
                                           default=("*",))
    forbidden_targets: tuple[str, ...] = _doc("Container paths no volume may be mounted at or below "
                                              "('/' forbids only the root itself).",
                                              check=_absolute_paths, default=("/", "/proc", "/sys", "/dev"))
    max_volumes: int = _doc("Most volumes one container may get.", default=8)
    allow_writable: bool = _doc('Allow "readonly": false (a private writable layer per container).',
                                default=False)
    unpack_wait_ms: int = _doc("How long CreateContainer waits for an image being unpacked before failing "
                               "with a retriable error (NRI allows 2000 ms per request).", default=1200)
    reconnect_max_ms: int = _doc("Longest pause between reconnect attempts to the NRI socket.", default=5000)
    metrics_address: str = _metrics_field("<mount_root>/metrics.sock")


@dataclass(frozen=True)
class Config:
    snapshotter: SnapshotterConfig = field(default_factory=SnapshotterConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    nri: NriConfig = field(default_factory=NriConfig)

    @classmethod
    def from_toml(cls, text: str, where: str = "config") -> "Config":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return _build(cls, data, "")

    @classmethod
    def load(cls, path: Path | None) -> "Config":
        """Read ``path`` (absent file → defaults when it is the default path)."""
        if path is None:
            return cls()
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            if Path(path) == DEFAULT_CONFIG_PATH:
                return cls()
            raise ConfigError(f"{path}: no such file") from None
        return cls.from_toml(text, str(path))


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{where}{key}'; known keys: {', '.join(sorted(names))}")
    values = {key: _convert(hints[key], value, f"{where}{key}") for key, value in data.items()}
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        if check and f.name in values and (problem := check(values[f.name])):
            raise ConfigError(f"{where}{f.name}: {problem}")
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    origin = typing.get_origin(hint)
    if hint is Path:
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{where}: expected an absolute path, got {value!r}")
        return Path(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType):
        raise ConfigError(f"{where}: unsupported type")
    return value


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from this model."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `pysnap config reference` from pysnap/config.py; do not edit by hand. -->",
        "",
        f"All three daemons read one TOML file, `{DEFAULT_CONFIG_PATH}` by default (`--config FILE` elsewhere).",
        "Every key is optional. An unknown key or a value of the wrong type stops the daemon with a message",
        "naming it. Command-line flags (`--root`, `--address`, `--socket`, …) override the file.",
    ]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines += ["", f"## [{section.name}]", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        field_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default
            shown = "`[" + ", ".join(f'"{v}"' for v in default) + "]`" if isinstance(default, tuple) else (
                f"`{str(default).lower()}`" if isinstance(default, bool) else
                f"`{default}`" if isinstance(default, int) else f'`"{default}"`')
            kind = {Path: "path", str: "string", int: "integer", bool: "boolean"}.get(field_hints[f.name],
                                                                                        "list of strings")
            lines.append(f"| `{f.name}` | {kind} | {shown} | {f.metadata['doc']} |")
    return "\n".join(lines) + "\n"
