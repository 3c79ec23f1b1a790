"""``pysnap install``: put pysnap on a node, idempotently.

Everything is planned first as a list of changes against a root directory (``/`` on a node, a
scratch directory in tests and image builds), then either shown as unified diffs (``--dry-run``)
or applied.  What gets written, all paths relative to the root:

- ``/usr/local/bin/pysnap``: a symlink to the running pysnap executable (the units run this path);
- ``/etc/systemd/system/pysnap-{snapshotter,content,nri}.service`` from the repository's
  ``systemd/`` directory, enabled the way ``systemctl enable`` does it (``*.wants/`` symlinks);
- ``/etc/pysnap/config.toml`` with every key commented out, only if there is none (an operator's
  file is never touched);
- ``/etc/containerd/conf.d/pysnap.toml``: the ``pysnap config containerd`` snippet plus the NRI
  settings, and one ``imports`` entry for ``/etc/containerd/conf.d/*.toml`` in containerd's main
  ``config.toml`` (edited in place, minimally, after a backup; every edit is re-parsed and
  compared with what was intended before anything is written);
- with ``--nri-mode preinstalled``: ``/opt/nri/plugins/NN-name`` (a launcher script containerd runs
  itself) and a logrotate rule for its log, instead of the NRI unit; with ``--nri-mode daemonset``
  neither (deploy/kubernetes runs the plugin), but NRI is still enabled in containerd.

How containerd merges imported files (checked in 1.7.24's ``services/server/config`` and 2.x's
``cmd/containerd/server/config``, and with ``containerd config dump`` of both):
top-level lists such as ``disabled_plugins`` are appended, so they work from the drop-in;
``[proxy_plugins.X]`` entries are merged by name; a ``[plugins."ID"]`` section from an import
*replaces* the main file's whole section in 1.7 but is merged key by key in 2.x, where arrays such as
the transfer service's ``unpack_config`` are still replaced as a whole.  Hence: on 1.7 NRI is enabled
in the main file when that file already has an NRI section (in the drop-in otherwise), and on 2.x
the drop-in repeats the main file's own ``unpack_config`` entries next to pysnap's.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .config import DEFAULT_CONFIG_PATH, Config, NriConfig
from .containerd_config import PARTS, containerd_snippet, nri_settings

BIN = PurePosixPath("/usr/local/bin/pysnap")  # the units' ExecStart= and the launcher's exec
UNIT_DIR = PurePosixPath("/etc/systemd/system")
CONFIG = PurePosixPath(str(DEFAULT_CONFIG_PATH))
CONTAINERD_CONFIG = PurePosixPath("/etc/containerd/config.toml")
DROPIN_DIR = PurePosixPath("/etc/containerd/conf.d")
DROPIN = DROPIN_DIR / "pysnap.toml"
IMPORTS_GLOB = f"{DROPIN_DIR}/*.toml"
NRI_PLUGIN_DIR = PurePosixPath("/opt/nri/plugins")
NRI_LOG = PurePosixPath("/var/log/pysnap/nri.log")
LOGROTATE = PurePosixPath("/etc/logrotate.d/pysnap")

COMPONENTS = ("snapshotter", "content", "nri")
NRI_MODES = ("external", "preinstalled", "daemonset")
CONTAINERD_VERSIONS = ("1.7", "2")
NRI_SECTION = "io.containerd.nri.v1.nri"
TRANSFER_SECTION = "io.containerd.transfer.v1.local"
MARKER = "Written by `pysnap install`"  # identifies files install may replace or remove


class InstallError(Exception):
    pass


def unit_name(component: str) -> str:
    return f"pysnap-{component}.service"


def unit_source_dir() -> Path:
    """The shipped units: ``systemd/`` of a source checkout, or ``share/pysnap/systemd`` of the
    environment pysnap was installed into (pyproject data-files)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "systemd", Path(sys.prefix) / "share" / "pysnap" / "systemd"):
        if (candidate / unit_name("snapshotter")).is_file():
            return candidate
    raise InstallError(f"cannot find pysnap's unit files (looked in {here.parent / 'systemd'} and "
                       f"{Path(sys.prefix) / 'share/pysnap/systemd'})")


def default_bin() -> Path:
    """The pysnap executable running this command (what /usr/local/bin/pysnap should point at)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "pysnap":
        return Path(os.path.abspath(argv0))
    return Path(sys.executable).parent / "pysnap"


# ------------------------------------------------------------------------------------------ changes

@dataclass
class Change:
    """One file, symlink or removal; ``old``/``new`` are text (for symlinks: the target), None = absent."""

    path: PurePosixPath
    kind: str  # "file", "symlink" or "remove"
    old: str | None
    new: str | None
    mode: int = 0o644
    old_mode: int | None = None
    backup: bool = False  # keep a copy of the old file beside it before replacing it
    why: str = ""

    def diff(self) -> str:
        label = str(self.path)
        if self.kind == "symlink":
            before = [f"symlink -> {self.old}\n"] if self.old is not None else []
            after = [f"symlink -> {self.new}\n"]
        else:
            before = (self.old or "").splitlines(keepends=True) if self.old is not None else []
            after = (self.new or "").splitlines(keepends=True) if self.new is not None else []
        lines = difflib.unified_diff(before, after, fromfile=label if self.old is not None else "/dev/null",
                                     tofile=label if self.new is not None else "/dev/null")
        text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                       for line in lines)
        if self.kind == "file" and self.old_mode is not None and self.old_mode != self.mode:
            if not text:
                text = f"--- {label}\n+++ {label}\n"
            text += f"mode {self.old_mode:04o} -> {self.mode:04o}\n"
        return text

    def summary(self) -> str:
        if self.kind == "remove":
            return f"remove {self.path}" + (f" ({self.why})" if self.why else "")
        if self.kind == "symlink":
            return f"link {self.path} -> {self.new}"
        verb = "create" if self.old is None else "update"
        return f"{verb} {self.path}" + (f" ({self.why})" if self.why else "")


@dataclass
class Options:
    root: Path = Path("/")
    containerd_version: str | None = None
    components: tuple[str, ...] = COMPONENTS
    nri_mode: str = "external"
    bin: Path | None = None


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    containerd_version: str = ""


class Root:
    """Paths of the target system under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __call__(self, path: PurePosixPath | str) -> Path:
        return self.root / str(path).lstrip("/")

    def read(self, path: PurePosixPath) -> str | None:
        try:
            return self(path).read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise InstallError(f"cannot read {path}: {exc}") from None

    def mode(self, path: PurePosixPath) -> int | None:
        try:
            return self(path).stat().st_mode & 0o7777
        except FileNotFoundError:
            return None

    def readlink(self, path: PurePosixPath) -> str | None:
        try:
            return os.readlink(self(path))
        except OSError:  # absent, or not a symlink
            return None


def _file(root: Root, changes: list[Change], path: PurePosixPath, text: str, mode: int = 0o644,
          backup: bool = False, why: str = "") -> None:
    """Add a change making ``path`` hold ``text`` with ``mode``, if it does not already."""
    target = root(path)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise InstallError(f"{path} exists and is not a regular file; move it away and run install again")
    old, old_mode = root.read(path), root.mode(path)
    if old == text and old_mode == mode:
        return
    changes.append(Change(path, "file", old, text, mode, old_mode, backup=backup and old is not None, why=why))


def _symlink(root: Root, changes: list[Change], path: PurePosixPath, target: str) -> None:
    current = root.readlink(path)
    if current == target:
        return
    if current is None and os.path.lexists(root(path)):
        raise InstallError(f"{path} exists and is not a symlink; move it away and run install again")
    changes.append(Change(path, "symlink", current, target))


# ------------------------------------------------------------------------------------------ planning

def plan(options: Options) -> Plan:
    root = Root(options.root)
    unknown = set(options.components) - set(COMPONENTS)
    if unknown or not options.components:
        raise InstallError(f"--with takes a comma-separated subset of {', '.join(COMPONENTS)}, "
                           f"got {','.join(options.components) or 'nothing'}")
    if options.nri_mode not in NRI_MODES:
        raise InstallError(f"--nri-mode must be one of {', '.join(NRI_MODES)}")
    result = Plan()
    config_text = root.read(CONFIG)
    config = Config.from_toml(config_text, str(CONFIG)) if config_text is not None else Config()
    main_text = root.read(CONTAINERD_CONFIG)
    main = _parse_containerd_config(main_text)
    result.containerd_version = _containerd_version(options, root, main)

    _plan_binary(root, options, result)
    if config_text is None:
        _file(root, result.changes, CONFIG, default_config_text(), why="defaults, every key commented out")
    _plan_units(root, options, result)
    _plan_nri_launcher(root, options, config.nri, result)
    _plan_containerd(root, options, config, result, main_text, main)
    return result


def _plan_binary(root: Root, options: Options, result: Plan) -> None:
    target = Path(options.bin) if options.bin else default_bin()
    if not target.is_absolute():
        raise InstallError(f"--bin must be an absolute path, got {target}")
    if str(target) == str(BIN):
        if not os.path.lexists(root(BIN)):
            raise InstallError(f"{BIN} does not exist: install pysnap there or pass --bin")
        return
    if options.root == Path("/") and not target.exists():
        raise InstallError(f"{target} does not exist: pass --bin with the path of the pysnap executable")
    link = root(BIN)
    if os.path.lexists(link) and not link.is_symlink():
        result.notes.append(f"{BIN} is a file, not a link to {target}: the units will run that one")
        return
    _symlink(root, result.changes, BIN, str(target))


def _unit_wanted_by(text: str) -> list[str]:
    section, wanted = "", []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Install" and line.startswith("WantedBy="):
            wanted += line.split("=", 1)[1].split()
    return wanted


def _plan_units(root: Root, options: Options, result: Plan) -> None:
    source = unit_source_dir()
    for component in COMPONENTS:
        name = unit_name(component)
        text = (source / name).read_text()
        wanted = component in options.components and not (component == "nri" and options.nri_mode != "external")
        if wanted:
            _file(root, result.changes, UNIT_DIR / name, text)
        for target in _unit_wanted_by(text):
            link = UNIT_DIR / f"{target}.wants" / name
            if wanted:
                _symlink(root, result.changes, link, str(UNIT_DIR / name))
            elif root.readlink(link) is not None:
                why = f"the NRI plugin runs as --nri-mode {options.nri_mode}" \
                    if component == "nri" and "nri" in options.components else f"{component} not selected"
                result.changes.append(Change(link, "remove", f"symlink -> {root.readlink(link)}\n", None,
                                             why=f"disable: {why}"))


def launcher_text(nri: NriConfig) -> str:
    return f"""#!/bin/sh
# {MARKER} (--nri-mode preinstalled): the pysnap NRI plugin, launched by
# containerd itself. containerd runs every executable in its NRI plugin_path named NN-name (any other executable there
# stops containerd), with only NRI_PLUGIN_NAME, NRI_PLUGIN_IDX and NRI_PLUGIN_SOCKET in the
# environment and stdout/stderr on /dev/null: hence absolute paths, a PATH for mount(8), and a log
# file. Rewritten by every install; settings live in {CONFIG} ([nri]).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PYTHONFAULTHANDLER=1
export PATH PYTHONFAULTHANDLER
umask 022
mkdir -p {NRI_LOG.parent}
exec {BIN} --config {CONFIG} serve nri >>{NRI_LOG} 2>&1
"""


def logrotate_text() -> str:
    return f"""# {MARKER}: the log of the pre-installed pysnap NRI plugin. containerd owns that process and
# nothing can ask it to reopen the file, hence copytruncate.
{NRI_LOG} {{
    weekly
    rotate 4
    maxsize 50M
    missingok
    notifempty
    compress
    delaycompress
    copytruncate
}}
"""


def _ours(root: Root, path: PurePosixPath) -> bool:
    try:
        with open(root(path), "rb") as f:
            return MARKER.encode() in f.read(4096)
    except OSError:
        return False


def _plan_nri_launcher(root: Root, options: Options, nri: NriConfig, result: Plan) -> None:
    preinstalled = "nri" in options.components and options.nri_mode == "preinstalled"
    launcher = None
    if preinstalled:
        if not re.fullmatch(r"[0-9]{2}", nri.plugin_index):
            raise InstallError(f"[nri] plugin_index = {nri.plugin_index!r}: a pre-installed plugin's file name "
                               "must start with exactly two digits (anything else stops containerd)")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", nri.plugin_name):
            raise InstallError(f"[nri] plugin_name = {nri.plugin_name!r}: use lowercase letters, digits and '-'")
        launcher = NRI_PLUGIN_DIR / f"{nri.plugin_index}-{nri.plugin_name}"
        _file(root, result.changes, launcher, launcher_text(nri), mode=0o755)
        _file(root, result.changes, LOGROTATE, logrotate_text())
        if result.containerd_version == "1.7":
            result.notes.append("containerd 1.7 exits if a pre-installed NRI plugin fails to register within "
                                "plugin_registration_timeout (5 s): keep pysnap working (`pysnap doctor`), "
                                "or use --nri-mode external")
    directory = root(NRI_PLUGIN_DIR)
    if directory.is_dir():  # earlier launchers of ours: another index/name, or the other mode
        for entry in sorted(directory.iterdir()):
            path = NRI_PLUGIN_DIR / entry.name
            if path != launcher and entry.is_file() and _ours(root, path):
                result.changes.append(Change(path, "remove", root.read(path), None,
                                             why="stale pysnap NRI launcher"))
    if not preinstalled and _ours(root, LOGROTATE):
        result.changes.append(Change(LOGROTATE, "remove", root.read(LOGROTATE), None, why="no pre-installed plugin"))


# ------------------------------------------------------------------------------------------ containerd

def _parse_containerd_config(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"{CONTAINERD_CONFIG} is not valid TOML ({exc}): fix it first") from None


def _containerd_version(options: Options, root: Root, main: dict[str, Any] | None) -> str:
    if options.containerd_version:
        if options.containerd_version not in CONTAINERD_VERSIONS:
            raise InstallError(f"--containerd-version must be one of {', '.join(CONTAINERD_VERSIONS)}")
        return options.containerd_version
    if options.root == Path("/"):
        binary = shutil.which("containerd")
        if binary:
            try:
                out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            match = re.search(r"\sv?(\d+)\.(\d+)\.\d+", out)
            if match and match.group(1) == "1" and int(match.group(2)) >= 7:
                return "1.7"
            if match and int(match.group(1)) >= 2:
                return "2"
            if match:
                raise InstallError(f"containerd {match.group(0).strip()} is not supported: pysnap needs 1.7 or 2.x")
    if main is not None and main.get("version") == 3:
        return "2"
    raise InstallError("cannot tell which containerd this is: pass --containerd-version 1.7 or 2")


def _config_version(containerd_version: str, main: dict[str, Any] | None) -> int:
    wanted = 2 if containerd_version == "1.7" else 3
    if main is None:
        return wanted
    found = main.get("version", 1)
    allowed = (2,) if containerd_version == "1.7" else (2, 3)
    if found not in allowed:
        shown = f"version = {found}" if "version" in main else "no version key (version 1)"
        raise InstallError(f"{CONTAINERD_CONFIG} has {shown}; containerd {containerd_version} with pysnap needs "
                           f"version = {wanted}: convert it (`containerd config migrate`) and run install again")
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise InstallError(f"cannot write {value!r} as TOML")


def dropin_text(containerd_version: str, config_version: int, config: Config, options: Options,
                main: dict[str, Any] | None, nri_in_main: bool) -> str:
    parts = tuple(p for p in PARTS if p in options.components and not (p == "nri" and nri_in_main))
    lines = [f"# {MARKER} for containerd {containerd_version}: pysnap's containerd settings, imported by",
             f"# {CONTAINERD_CONFIG}. Rewritten by every install: change {CONFIG} instead and run it again.",
             f"version = {config_version}",
             _dropin_snippet(containerd_version, config, parts, options.nri_mode)]
    if containerd_version == "2" and "snapshotter" in parts:
        # containerd replaces the whole unpack_config array from an import: keep the main file's entries.
        ours = tomllib.loads(containerd_snippet(containerd_version, config, parts))
        listed = {(e.get("platform"), e.get("snapshotter"))
                  for e in ours.get("plugins", {}).get(TRANSFER_SECTION, {}).get("unpack_config", [])}
        theirs = (((main or {}).get("plugins") or {}).get(TRANSFER_SECTION) or {}).get("unpack_config") or []
        kept = [e for e in theirs if isinstance(e, dict) and (e.get("platform"), e.get("snapshotter")) not in listed]
        if kept:
            lines += ["", f"# Copied from {CONTAINERD_CONFIG}: an imported unpack_config replaces the main file's."]
        for entry in kept:
            lines += ["", f'[[plugins."{TRANSFER_SECTION}".unpack_config]]']
            lines += [f"  {key} = {_toml_value(value)}" for key, value in entry.items()]
    text = "\n".join(lines).rstrip("\n") + "\n"
    tomllib.loads(text)  # a bug here must never reach containerd
    return text


def _dropin_snippet(containerd_version: str, config: Config, parts: tuple[str, ...], nri_mode: str) -> str:
    """``pysnap config containerd`` output, minus its advice for pasting into a main file (an
    imported file's disabled_plugins list is appended to the main file's by containerd)."""
    lines = containerd_snippet(containerd_version, config, parts, nri_mode).rstrip("\n").splitlines()
    return "\n".join(line for line in lines if not line.startswith("# Top-level key:"))


def _plan_containerd(root: Root, options: Options, config: Config, result: Plan, main_text: str | None,
                     main: dict[str, Any] | None) -> None:
    version = result.containerd_version
    config_version = _config_version(version, main)
    # 1.7 replaces a main-file [plugins."…nri"] section wholesale with an imported one, losing the
    # operator's keys: when the main file has one, NRI is switched on there instead.
    nri_in_main = (version == "1.7" and main is not None and "nri" in options.components
                   and NRI_SECTION in (main.get("plugins") or {}))
    _file(root, result.changes, DROPIN, dropin_text(version, config_version, config, options, main, nri_in_main))
    if main_text is None:
        text = (f"# {MARKER}: containerd's settings are its defaults plus the files imported below.\n"
                f"version = {config_version}\n"
                f'imports = ["{IMPORTS_GLOB}"]\n')
        _file(root, result.changes, CONTAINERD_CONFIG, text, why="containerd had no config file")
        return
    assert main is not None
    text = with_imports(main_text, main)
    if nri_in_main:
        text = with_table_keys(text, ("plugins", NRI_SECTION), nri_settings(config, options.nri_mode))
    if text != main_text:
        _file(root, result.changes, CONTAINERD_CONFIG, text, mode=root.mode(CONTAINERD_CONFIG) or 0o644, backup=True,
              why="import the pysnap drop-in" + (", enable NRI" if nri_in_main else ""))


# -- minimal, verified edits of containerd's main config.toml

_HEADER = re.compile(r"^\s*\[")


def _top_level_end(lines: list[str]) -> int:
    """Index of the first table header line (len(lines) if none)."""
    return next((i for i, line in enumerate(lines) if _HEADER.match(line)), len(lines))


def _import_covers(pattern: str) -> bool:
    path = pattern if pattern.startswith("/") else f"{CONTAINERD_CONFIG.parent}/{pattern}"
    path = os.path.normpath(path)
    return (path.count("/") == str(DROPIN).count("/") and fnmatch.fnmatchcase(str(DROPIN), path))


def with_imports(text: str, data: dict[str, Any]) -> str:
    """``text`` whose top-level ``imports`` includes the drop-in directory (unchanged if it already does)."""
    imports = data.get("imports")
    if imports is not None and not (isinstance(imports, list) and all(isinstance(p, str) for p in imports)):
        raise InstallError(f"{CONTAINERD_CONFIG}: imports is not a list of strings")
    if imports and any(_import_covers(p) for p in imports):
        return text
    expected = dict(data)
    expected["imports"] = [*(imports or []), IMPORTS_GLOB]
    candidates = _append_to_imports(text) if imports is not None else _insert_imports(text)
    for candidate in candidates:
        if _parses_to(candidate, expected):
            return candidate
    raise InstallError(f"could not add the imports entry to {CONTAINERD_CONFIG} safely: add \"{IMPORTS_GLOB}\" "
                       f"to its top-level imports list yourself (imports = [\"{IMPORTS_GLOB}\"]) and run install again")


def _insert_imports(text: str) -> list[str]:
    line = f'imports = ["{IMPORTS_GLOB}"]\n'
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    end = _top_level_end(lines)
    positions = [i + 1 for i, l in enumerate(lines[:end]) if re.match(r"^\s*version\s*=", l)]
    positions += [end, 0]
    return ["".join(lines[:i] + [line] + lines[i:]) for i in positions]


def _append_to_imports(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    offset = 0
    for line in lines[:_top_level_end(lines)]:
        match = re.match(r"^\s*imports\s*=\s*\[", line)
        if match:
            start = offset + match.end() - 1
            break
        offset += len(line)
    else:
        return []
    close = _matching_bracket(text, start)
    if close is None:
        return []
    entry = f'"{IMPORTS_GLOB}"'
    last = _last_value_end(text, start, close)
    if last is None:  # empty array
        return [text[:start + 1] + entry + text[close:]]
    trailing_comma = text[last - 1] == ","
    comma = "" if trailing_comma else ","
    if "\n" not in text[start:close]:
        return [text[:last] + (f" {entry}" if trailing_comma else f", {entry}") + text[last:]]
    # Multi-line array: a line of its own, after the last value's line (and its comment).
    line_start = text.rfind("\n", 0, last - 1) + 1
    indent = re.match(r"[ \t]*", text[line_start:]).group(0)
    eol = text.find("\n", last)
    eol = close if eol == -1 or eol > close else eol
    line = f"\n{indent}{entry}" + ("," if trailing_comma else "")
    return [text[:last] + comma + text[last:eol] + line + text[eol:]]


def _scan(text: str, start: int):
    """Yield (index, char, state) from ``start``; state is "code", "string" or "comment"."""
    i, quote, comment = start, "", False
    while i < len(text):
        c = text[i]
        if comment:
            comment = c != "\n"
            yield i, c, "comment" if comment else "code"
        elif quote:
            yield i, c, "string"
            if quote == '"' and c == "\\" and i + 1 < len(text):
                i += 1
                yield i, text[i], "string"
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
            yield i, c, "string"
        elif c == "#":
            comment = True
            yield i, c, "comment"
        else:
            yield i, c, "code"
        i += 1


def _matching_bracket(text: str, start: int) -> int | None:
    depth = 0
    for i, c, state in _scan(text, start):
        if state != "code":
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return i
    return None


def _last_value_end(text: str, start: int, close: int) -> int | None:
    """Index just past the last non-blank, non-comment character between ``[`` at ``start`` and
    ``]`` at ``close`` (None for an empty array)."""
    last = None
    for i, c, state in _scan(text, start + 1):
        if i >= close:
            break
        if state != "comment" and not c.isspace():
            last = i + 1
    return last


def with_table_keys(text: str, table: tuple[str, ...], values: dict[str, Any]) -> str:
    """``text`` with ``values`` set in the existing table ``table`` (replacing or adding key lines)."""
    data = tomllib.loads(text)
    section = data
    for name in table:
        section = section.get(name, {})
    if all(section.get(k) == v for k, v in values.items()):
        return text
    expected = _with_nested(data, table, values)
    header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(_key_pattern(n) for n in table) + r"\s*\]\s*(#.*)?$")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    starts = [i for i, line in enumerate(lines) if header.match(line)]
    if len(starts) == 1:
        begin = starts[0] + 1
        end = next((i for i in range(begin, len(lines)) if _HEADER.match(lines[i])), len(lines))
        body = lines[begin:end]
        indent = next((re.match(r"\s*", l).group(0) for l in body if l.strip() and not l.strip().startswith("#")),
                      "  ")
        for key, value in values.items():
            pattern = re.compile(r"^(\s*)" + re.escape(key) + r"(\s*=\s*)[^#\n]*?(\s*#.*)?$")
            for j, line in enumerate(body):
                match = pattern.match(line.rstrip("\n"))
                if match:
                    body[j] = f"{match.group(1)}{key}{match.group(2)}{_toml_value(value)}  # pysnap install\n"
                    break
            else:
                body.insert(0, f"{indent}{key} = {_toml_value(value)}  # pysnap install\n")
        candidate = "".join(lines[:begin] + body + lines[end:])
        if _parses_to(candidate, expected):
            return candidate
    dotted = ".".join(f'"{n}"' if not re.fullmatch(r"[A-Za-z0-9_-]+", n) else n for n in table)
    settings = ", ".join(f"{k} = {_toml_value(v)}" for k, v in values.items())
    raise InstallError(f"could not edit [{dotted}] in {CONTAINERD_CONFIG} safely: set {settings} there yourself "
                       "and run install again")


def _key_pattern(name: str) -> str:
    bare = re.escape(name)
    return f"(?:{bare}|\"{bare}\"|'{bare}')" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f"(?:\"{bare}\"|'{bare}')"


def _with_nested(data: dict[str, Any], table: tuple[str, ...], values: dict[str, Any]) -> dict[str, Any]:
    copy = dict(data)
    node = copy
    for name in table:
        node[name] = dict(node.get(name, {}))
        node = node[name]
    node.update(values)
    return copy


def _parses_to(text: str, expected: dict[str, Any]) -> bool:
    try:
        return tomllib.loads(text) == expected
    except tomllib.TOMLDecodeError:
        return False


# ------------------------------------------------------------------------------------------ config

def default_config_text() -> str:
    """/etc/pysnap/config.toml with every key of the model commented out at its default."""
    lines = [f"# pysnap configuration, read by every pysnap daemon and command ({CONFIG}).",
             f"# {MARKER} with every key at its default, commented out: uncomment to change one.",
             "# An unknown key or a bad value stops the daemons with a message naming it;",
             "# `pysnap config reference` lists the keys. install never overwrites this file."]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        lines += ["", f"[{section.name}]"]
        for f in dataclasses.fields(hints[section.name]):
            default = f.default
            value = list(default) if isinstance(default, tuple) else str(default) if isinstance(default, Path) \
                else default
            lines += [f"# {f.metadata['doc']}", f"# {f.name} = {_toml_value(value)}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ applying

def apply(root: Path, changes: list[Change]) -> list[str]:
    """Carry out ``changes`` under ``root``; returns one line per thing done."""
    where = Root(root)
    done = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for change in changes:
        target = where(change.path)
        if change.kind == "remove":
            target.unlink(missing_ok=True)
        elif change.kind == "symlink":
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.pysnap-install")
            tmp.unlink(missing_ok=True)
            os.symlink(change.new, tmp)
            os.replace(tmp, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if change.backup:
                backup = target.with_name(f"{target.name}.pysnap-backup-{stamp}")
                shutil.copy2(target, backup)
                done.append(f"backed up {change.path} as {backup.name}")
            _write_atomically(target, change.new or "", change.mode)
        done.append(change.summary())
    return done


def _write_atomically(target: Path, text: str, mode: int) -> None:
    # The temporary file is never executable, whatever the final mode: containerd starts every
    # executable in its NRI plugin directory and dies on one not named NN-name.
    tmp = target.with_name(f".{target.name}.pysnap-install")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(target, mode)
