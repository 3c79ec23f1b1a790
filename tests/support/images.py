"""Deterministic OCI images built in Python, and the tree a container must see when it runs them.

Layers are PAX tarballs (tarfile) with fixed mtimes, gzip-compressed with mtime 0, so the same inputs always give
the same digests.  Each layer is described by a list of `Entry`; `apply_layers` computes the final tree the OCI
layer rules give (whiteouts `.wh.NAME`, opaque directories `.wh..wh..opq`, replacement of entries, directory
metadata taken from the topmost layer that lists the directory), as a mapping path -> `Node`.

Two images:
  * `busybox_image(busybox)`: one layer with the static busybox at /bin/busybox and a few applet symlinks.
  * `multilayer_image(busybox)`: that same base layer plus three layers exercising whiteouts, opaque directories,
    hardlinks, symlinks, user.* xattrs, modes and owners, and one large (64 MiB) seeded-random file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import posixpath
import random
import stat
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

MTIME = 1_700_000_000  # fixed modification time of every entry (2023-11-14T22:13:20Z)
LARGE_FILE_SIZE = 64 * 1024 * 1024
LARGE_FILE_SEED = 20240611

# Applets linked in /bin: what tests need inside a container (a shell, find/stat/sha256sum/readlink, sleep).
BUSYBOX_APPLETS = ("sh", "cat", "echo", "env", "find", "id", "ls", "mkdir", "readlink", "rm", "sha256sum",
                   "sleep", "stat", "touch", "true", "wc")

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "i686": "386", "i386": "386"}


def host_architecture() -> str:
    """The host architecture in OCI/Go spelling (amd64, arm64, ...)."""
    machine = platform.machine()
    try:
        return _GOARCH[machine]
    except KeyError:
        raise RuntimeError(f"unknown machine type {machine!r}") from None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ layer entries

@dataclass(frozen=True)
class Entry:
    """One tar entry.  `path` is relative to the root, without a leading slash.

    kind: "dir", "file", "symlink", "hardlink" (target = path of an earlier file of the SAME layer),
    "whiteout" (hides `path` of lower layers; written as DIR/.wh.NAME) or
    "opaque" (hides the lower contents of directory `path`; written as PATH/.wh..wh..opq).
    """

    path: str
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    xattrs: tuple[tuple[str, str], ...] = ()
    mtime: int = MTIME

    def tar_name(self) -> str:
        if self.kind == "whiteout":
            parent, name = posixpath.split(self.path)
            return posixpath.join(parent, WHITEOUT_PREFIX + name)
        if self.kind == "opaque":
            return posixpath.join(self.path, OPAQUE_MARKER)
        return self.path


def d(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, xattrs: dict[str, str] | None = None) -> Entry:
    return Entry(path, "dir", mode, uid, gid, xattrs=tuple(sorted((xattrs or {}).items())))


def f(path: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
      xattrs: dict[str, str] | None = None) -> Entry:
    if isinstance(data, str):
        data = data.encode()
    return Entry(path, "file", mode, uid, gid, data=data, xattrs=tuple(sorted((xattrs or {}).items())))


def sym(path: str, target: str, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, "symlink", 0o777, uid, gid, target=target)


def hardlink(path: str, target: str) -> Entry:
    return Entry(path, "hardlink", target=target)


def whiteout(path: str) -> Entry:
    return Entry(path, "whiteout")


def opaque(path: str) -> Entry:
    return Entry(path, "opaque")


# ------------------------------------------------------------------------------------------------ expected tree

@dataclass(frozen=True)
class Node:
    """What a path of the final tree must look like.

    mode: permission bits including setuid/setgid/sticky (stat.S_IMODE).  size/sha256: regular files only.
    nlink: regular files only (number of names of the inode in its layer).  link_group: for hardlinked files,
    an id shared by every name of the same inode.  mtime: None for the root directory (the snapshotter makes it).
    """

    kind: str  # "dir" | "file" | "symlink"
    mode: int
    uid: int
    gid: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None
    xattrs: tuple[tuple[str, str], ...] = ()
    mtime: int | None = MTIME
    nlink: int = 1
    link_group: str | None = None


ROOT_NODE = Node("dir", 0o755, 0, 0, mtime=None)


def _is_under(path: str, top: str) -> bool:
    return path.startswith(top + "/") if top else path != ""


def apply_layers(layers: list[list[Entry]]) -> dict[str, Node]:
    """Apply layers bottom-up the way containerd's applier and overlayfs combine them; "" is the root."""
    tree: dict[str, Node] = {"": ROOT_NODE}
    for index, entries in enumerate(layers):
        _check_layer(index, entries)
        # Whiteouts and opaque markers only hide what LOWER layers provide: apply them before this layer's additions.
        for e in entries:
            if e.kind == "whiteout":
                for p in [p for p in tree if p == e.path or _is_under(p, e.path)]:
                    del tree[p]
            elif e.kind == "opaque":
                for p in [p for p in tree if _is_under(p, e.path)]:
                    del tree[p]
        groups: dict[str, list[str]] = {}
        for e in entries:
            if e.kind in ("whiteout", "opaque"):
                continue
            old = tree.get(e.path)
            if old is not None and not (old.kind == "dir" and e.kind == "dir"):
                for p in [p for p in tree if _is_under(p, e.path)]:
                    del tree[p]
            if e.kind == "dir":
                tree[e.path] = Node("dir", e.mode, e.uid, e.gid, xattrs=e.xattrs, mtime=e.mtime)
            elif e.kind == "file":
                tree[e.path] = Node("file", e.mode, e.uid, e.gid, size=len(e.data),
                                    sha256=hashlib.sha256(e.data).hexdigest(), xattrs=e.xattrs, mtime=e.mtime)
            elif e.kind == "symlink":
                tree[e.path] = Node("symlink", 0o777, e.uid, e.gid, target=e.target, mtime=e.mtime)
            elif e.kind == "hardlink":
                groups.setdefault(e.target, [e.target]).append(e.path)
        for first, names in groups.items():
            group_id = f"layer{index}:{first}"
            base = tree[first]
            for name in names:
                tree[name] = replace(base, nlink=len(names), link_group=group_id)
    return tree


def _check_layer(index: int, entries: list[Entry]) -> None:
    """Keep layers unambiguous: every parent directory is listed earlier in the same layer (as docker does),
    hardlinks point to a file listed earlier in the same layer, no path is listed twice."""
    seen: dict[str, Entry] = {}
    for e in entries:
        name = e.tar_name()
        if name in seen:
            raise ValueError(f"layer {index}: {name} listed twice")
        parent = posixpath.dirname(name)
        if parent and (parent not in seen or seen[parent].kind != "dir"):
            raise ValueError(f"layer {index}: parent directory of {name} is not listed before it")
        if e.kind == "hardlink" and (e.target not in seen or seen[e.target].kind != "file"):
            raise ValueError(f"layer {index}: hardlink {e.path} -> {e.target}: no such file earlier in the layer")
        seen[name] = e


# ------------------------------------------------------------------------------------------------ blobs

@dataclass(frozen=True)
class Layer:
    blob: bytes  # gzip-compressed tar
    digest: str  # of the compressed blob
    diff_id: str  # of the uncompressed tar

    @property
    def size(self) -> int:
        return len(self.blob)


def build_layer(entries: list[Entry], compresslevel: int = 6) -> Layer:
    raw = io.BytesIO()
    files: dict[str, Entry] = {}
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            # Like any tar writer, store the inode's metadata on every name of a hardlinked file: appliers
            # (containerd's included) apply a link header's mode/owner to the shared inode.
            meta = files[e.target] if e.kind == "hardlink" else e
            if e.kind == "file":
                files[e.path] = e
            info = tarfile.TarInfo(e.tar_name())
            info.mtime = meta.mtime
            info.uid, info.gid = meta.uid, meta.gid
            info.uname = info.gname = ""
            info.mode = meta.mode
            payload = None
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif e.kind == "file":
                info.type = tarfile.REGTYPE
                info.size = len(e.data)
                payload = io.BytesIO(e.data)
            elif e.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
            elif e.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = e.target
            elif e.kind in ("whiteout", "opaque"):
                info.type = tarfile.REGTYPE
                info.mode = 0o644
            else:
                raise ValueError(f"unknown entry kind {e.kind!r}")
            if e.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs}
            tar.addfile(info, payload)
    tar_bytes = raw.getvalue()
    blob = gzip.compress(tar_bytes, compresslevel=compresslevel, mtime=0)
    return Layer(blob=blob, digest=sha256_digest(blob), diff_id=sha256_digest(tar_bytes))


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Image:
    """An OCI image (single-platform manifest) with the tree its layers produce."""

    layers: list[Layer]
    config: bytes
    manifest: bytes
    expected: dict[str, Node] = field(repr=False)
    cmd: list[str] = field(default_factory=list)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    def blobs(self):
        """(digest, bytes) of the config and every layer."""
        yield self.config_digest, self.config
        for layer in self.layers:
            yield layer.digest, layer.blob

    def chain_ids(self) -> list[str]:
        """ChainID of each layer prefix, bottom first: the committed snapshot names an unpack creates."""
        chain: list[str] = []
        for layer in self.layers:
            if not chain:
                chain.append(layer.diff_id)
            else:
                chain.append(sha256_digest(f"{chain[-1]} {layer.diff_id}".encode()))
        return chain


def build_image(layer_entries: list[list[Entry]], cmd: list[str], compresslevels: list[int] | None = None) -> Image:
    levels = compresslevels or [6] * len(layer_entries)
    layers = [build_layer(entries, level) for entries, level in zip(layer_entries, levels, strict=True)]
    config = _canonical_json({
        "architecture": host_architecture(),
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": f"pysnap tests layer {i}"} for i in range(len(layers))],
    })
    manifest = _canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA_TYPE_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
    })
    return Image(layers=layers, config=config, manifest=manifest, expected=apply_layers(layer_entries), cmd=cmd)


# ------------------------------------------------------------------------------------------------ the images

def busybox_layer(busybox: str | Path) -> list[Entry]:
    """Base layer: the static busybox at /bin/busybox, applet symlinks, and the usual top-level directories."""
    data = Path(busybox).read_bytes()
    entries = [d("bin"), f("bin/busybox", data, mode=0o755)]
    entries += [sym(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS]
    entries += [d(name) for name in ("dev", "etc", "proc", "run", "sys")]
    entries += [d("root", 0o700), d("tmp", 0o1777)]
    return entries


def busybox_image(busybox: str | Path) -> Image:
    return build_image([busybox_layer(busybox)], cmd=["/bin/sh"])


def large_file_data() -> bytes:
    return random.Random(LARGE_FILE_SEED).randbytes(LARGE_FILE_SIZE)


LONG_NAME = "long-" + "n" * 150  # > 100 bytes: needs a PAX path record


def multilayer_layers(busybox: str | Path, large: bytes | None = None) -> list[list[Entry]]:
    """Busybox base + three layers; everything under /t.  See the module docstring for what each part exercises."""
    lower = [
        d("t"),
        f("t/keep.txt", "kept from layer 1\n"),
        f("t/gone.txt", "whited out in layer 2\n"),
        d("t/gone-dir"), d("t/gone-dir/sub"), f("t/gone-dir/sub/deep.txt", "hidden\n"), f("t/gone-dir/a", "hidden\n"),
        sym("t/gone-link", "keep.txt"),
        d("t/opq"), f("t/opq/old1", "old1\n"), d("t/opq/oldsub"), f("t/opq/oldsub/old2", "old2\n"),
        f("t/replaced.txt", "version 1\n"),
        d("t/dir-to-file"), f("t/dir-to-file/child", "child of a directory later replaced by a file\n"),
        f("t/file-to-dir", "a file later replaced by a directory\n"),
        d("t/modes", 0o755),
        f("t/modes/setuid", "#!/bin/sh\n", mode=0o4755),
        f("t/modes/setgid", "#!/bin/sh\n", mode=0o2755, gid=50),
        f("t/modes/private", "secret\n", mode=0o600, uid=1000, gid=1000),
        f("t/modes/readonly", "ro\n", mode=0o444, uid=12345, gid=54321),
        f("t/modes/none", "no permissions\n", mode=0o000, uid=65534, gid=65534),
        d("t/modes/sticky", 0o1777),
        d("t/modes/owned", 0o750, uid=1000, gid=100),
        f("t/modes/owned/file", "owned\n", mode=0o640, uid=1000, gid=100),
        d("t/hl"), f("t/hl/a", "one inode, three names\n", mode=0o640, uid=7, gid=8),
        hardlink("t/hl/b", "t/hl/a"),
        d("t/hl2"), hardlink("t/hl2/c", "t/hl/a"),
        d("t/links"),
        sym("t/links/abs", "/t/keep.txt"),
        sym("t/links/rel", "../keep.txt"),
        sym("t/links/dangling", "/does/not/exist"),
        sym("t/links/dir", "../opq"),
        sym("t/links/owned", "../keep.txt", uid=1000, gid=1000),
        d("t/xattr", xattrs={"user.dir": "on a directory"}),
        f("t/xattr/one", "x\n", xattrs={"user.x": "hello"}),
        f("t/xattr/many", "y\n", xattrs={"user.a": "1", "user.b": "two", "user.long": "v" * 200}),
        f("t/empty", ""),
        d("t/deep"), d("t/deep/a"), d("t/deep/a/b"), f(f"t/deep/a/b/{LONG_NAME}", "long name\n"),
        f("t/ünïcödé", "utf-8 name\n"),
    ]
    middle = [
        d("t"),
        whiteout("t/gone.txt"),
        whiteout("t/gone-dir"),
        whiteout("t/gone-link"),
        d("t/opq", 0o755), opaque("t/opq"), f("t/opq/new1", "new1\n"),
        f("t/replaced.txt", "version 2, longer than version 1\n", mode=0o600),
        f("t/dir-to-file", "now a file\n"),
        d("t/file-to-dir"), f("t/file-to-dir/child", "child\n"), f("t/file-to-dir/stays", "stays\n"),
        d("t/modes", 0o750, uid=1000, gid=1000),
        d("t/xattr", xattrs={"user.dir": "changed in layer 2"}),
        f("t/xattr/two", "z\n", xattrs={"user.layer": "2"}),
    ]
    top = [
        d("t"),
        d("t/gone-dir"), f("t/gone-dir/new", "recreated in layer 3 after the whiteout in layer 2\n"),
        d("t/file-to-dir"), whiteout("t/file-to-dir/child"),
        d("t/big"), f("t/big/large.bin", large if large is not None else large_file_data(), mode=0o644),
    ]
    return [busybox_layer(busybox), lower, middle, top]


def multilayer_image(busybox: str | Path) -> Image:
    # The large random file does not compress: level 1 keeps the build fast.
    return build_image(multilayer_layers(busybox), cmd=["/bin/sh"], compresslevels=[6, 6, 6, 1])


# ------------------------------------------------------------------------------------------------ reading trees

def scan_tree(root: str | Path) -> dict[str, Node]:
    """The tree under `root` on this host (e.g. a mounted view), in the same shape as `Image.expected`.

    Hardlink groups are keyed by inode; `mtime` of the root is left out like in `ROOT_NODE`."""
    root = Path(root)
    out: dict[str, Node] = {}
    by_inode: dict[int, list[str]] = {}

    def visit(path: Path, rel: str) -> None:
        st = path.lstat()
        xattrs = _read_xattrs(path)
        mtime = None if rel == "" else int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            out[rel] = Node("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs=xattrs, mtime=mtime)
            for child in sorted(path.iterdir()):
                visit(child, posixpath.join(rel, child.name) if rel else child.name)
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = Node("symlink", 0o777, st.st_uid, st.st_gid, target=str(path.readlink()), xattrs=xattrs,
                            mtime=mtime)
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            out[rel] = Node("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size=st.st_size,
                            sha256=h.hexdigest(), xattrs=xattrs, mtime=mtime, nlink=st.st_nlink)
            if st.st_nlink > 1:
                by_inode.setdefault(st.st_ino, []).append(rel)
        else:
            out[rel] = Node(f"other:{stat.S_IFMT(st.st_mode):o}", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                            mtime=mtime)

    visit(root, "")
    for names in by_inode.values():
        group_id = f"inode:{min(names)}"
        for name in names:
            out[name] = replace(out[name], link_group=group_id)
    return out


def _read_xattrs(path: Path) -> tuple[tuple[str, str], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False).decode(errors="surrogateescape"))
                        for n in names if n.startswith("user.")))


def normalise_groups(tree: dict[str, Node]) -> dict[str, Node]:
    """Replace hardlink group ids by the smallest path of each group, so trees built in different ways compare."""
    members: dict[str, list[str]] = {}
    for path, node in tree.items():
        if node.link_group is not None:
            members.setdefault(node.link_group, []).append(path)
    rename = {gid: min(paths) for gid, paths in members.items()}
    return {p: (replace(n, link_group=rename[n.link_group]) if n.link_group else n)
            for p, n in tree.items()}
