"""The benchmark image: a deterministic synthetic root filesystem in six layers, built with tests/support/images.py.

It imitates a distribution image in file-count terms: tens of thousands of small files (sizes drawn from a
log-normal distribution, median ~3 KB) in a deep directory tree, some medium binaries, a few large files,
symlinks, hardlinks, a whiteout layer and an opaque directory.  Text-like files compress about as well as real text;
binaries are a mix of random and zero-filled blocks; one large file is plain random (incompressible).

Built blobs are cached under $PYSNAP_CACHE/bench-images/<key>/ (key: scale + this file's hash), so only the first
run pays for building and compressing.  `CachedImage` offers what tests/support/registry.py's pusher needs
(`blobs()`, `manifest`, `manifest_digest`) plus the chain IDs the unpack creates.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .common import log
from support import images as img
from support import toolchain

# Layers at scale 1.0: (name, number of small files, large files as (name, MiB, kind)).
LAYERS = (
    ("base-os", 9000, (("usr/lib/locale/locale-archive", 12, "text"),)),
    ("libraries", 6000, (("usr/lib/x86_64-linux-gnu/libbig.so.1", 24, "binary"),
                         ("usr/lib/x86_64-linux-gnu/libhuge.so.2", 18, "binary"))),
    ("python", 11000, ()),
    ("assets", 400, (("opt/assets/weights.bin", 64, "random"), ("opt/assets/index.bin", 40, "binary"),
                     ("opt/assets/catalog.txt", 24, "text"))),
    ("app", 3500, (("opt/app/bin/server", 16, "binary"),)),
    ("config", 300, ()),
)
TOP_DIRS = {"base-os": ("etc", "usr/share", "usr/bin", "var/lib"), "libraries": ("usr/lib", "usr/lib/x86_64-linux-gnu"),
            "python": ("usr/lib/python3/dist-packages",), "assets": ("opt/assets/data",), "app": ("opt/app",),
            "config": ("etc/app",)}
WORDS_SEED = 424242


def _pool_text(rng: random.Random, size: int) -> bytes:
    """Pseudo-text from a 4096-word vocabulary: compresses about 3:1, like source code and docs."""
    letters = "abcdefghijklmnopqrstuvwxyz_"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 12))) for _ in range(4096)]
    seps = [" ", " ", " ", " ", "\n", ", ", "(", ") ", ": ", " = ", ".", "\n    "]
    parts, total = [], 0
    while total < size:
        word = rng.choice(vocab) + rng.choice(seps)
        parts.append(word)
        total += len(word)
    return "".join(parts).encode()[:size]


class _Content:
    """Deterministic file contents by kind."""

    def __init__(self) -> None:
        rng = random.Random(WORDS_SEED)
        self.text = _pool_text(rng, 8 << 20)
        self.rng = random.Random(WORDS_SEED + 1)

    def make(self, kind: str, size: int) -> bytes:
        rng = self.rng
        if kind == "text":
            out = bytearray()
            while len(out) < size:
                start = rng.randrange(0, len(self.text) - 1)
                out += self.text[start:start + min(size - len(out), 64 << 10)]
            return bytes(out)
        if kind == "random":
            return rng.randbytes(size)
        # "binary": random blocks with zero-filled and repeated stretches, compresses about 1.6:1
        out = bytearray()
        while len(out) < size:
            choice = rng.random()
            block = rng.choice((512, 1024, 4096))
            if choice < 0.55:
                out += rng.randbytes(block)
            elif choice < 0.8:
                out += bytes(block)
            else:
                start = rng.randrange(0, len(self.text) - block)
                out += self.text[start:start + block]
        return bytes(out[:size])


def _small_size(rng: random.Random) -> int:
    # log-normal: median 3 KB, mean ~7 KB, capped at 1 MiB; 3 % empty files
    if rng.random() < 0.03:
        return 0
    return min(int(rng.lognormvariate(8.0, 1.3)), 1 << 20)


def _layer_entries(index: int, name: str, files: int, large: tuple, content: _Content,
                   lower_files: list[str]) -> tuple[list[img.Entry], list[str]]:
    rng = random.Random(1000 + index)
    entries: list[img.Entry] = []
    dirs: set[str] = set()

    def ensure_dir(path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in dirs:
                dirs.add(sub)
                entries.append(img.d(sub))

    made: list[str] = []
    tops = TOP_DIRS[name]
    # ~25 files per directory, three levels below the layer's top directories
    n_dirs = max(1, files // 25)
    leaf_dirs = []
    for i in range(n_dirs):
        top = tops[i % len(tops)]
        leaf_dirs.append(f"{top}/{name}-pkg{i // 12:03d}/mod{i % 12:02d}")
    for i in range(files):
        directory = leaf_dirs[i % len(leaf_dirs)]
        ensure_dir(directory)
        kind = "binary" if (name == "libraries" and i % 3 == 0) else "text"
        suffix = {"python": ".py", "libraries": ".so" if kind == "binary" else ".h"}.get(name, ".txt")
        path = f"{directory}/f{i:05d}{suffix}"
        mode = 0o755 if (name == "base-os" and directory.startswith("usr/bin")) else 0o644
        entries.append(img.f(path, content.make(kind, _small_size(rng)), mode=mode))
        made.append(path)
        if i % 40 == 7:  # symlinks, some relative, some absolute
            target = os.path.basename(path) if i % 80 == 7 else "/" + path
            entries.append(img.sym(f"{directory}/link{i:05d}", target))
        if i % 200 == 11:  # hardlink in the same directory
            entries.append(img.hardlink(f"{directory}/hard{i:05d}", path))
    for path, mib, kind in large:
        ensure_dir(os.path.dirname(path))
        entries.append(img.f(path, content.make(kind, mib << 20), mode=0o755 if kind == "binary" else 0o644))
        made.append(path)
    if name == "app" and lower_files:
        # whiteouts of base-layer files (package removal), each parent directory listed first
        for path in lower_files[::180][:50]:
            ensure_dir(os.path.dirname(path))
            entries.append(img.whiteout(path))
    if name == "config":
        ensure_dir("etc/app/conf.d")
        entries.append(img.opaque("etc/app/conf.d"))
        entries.append(img.f("etc/app/conf.d/only.conf", "replaces the directory's lower contents\n"))
    return entries, made


def scaled_layers(scale: float) -> list[tuple[str, int, tuple]]:
    out = []
    for name, files, large in LAYERS:
        scaled_large = tuple((p, max(1, int(mib * scale)), kind) for p, mib, kind in large)
        out.append((name, max(10, int(files * scale)), scaled_large))
    return out


@dataclass
class CachedImage:
    directory: Path
    manifest: bytes
    config: bytes
    layers: list[dict]  # {"digest", "size", "diff_id", "name", "files", "uncompressed"}

    @property
    def manifest_digest(self) -> str:
        return img.sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return img.sha256_digest(self.config)

    def blobs(self):
        yield self.config_digest, self.config
        for layer in self.layers:
            yield layer["digest"], (self.directory / "blobs" / layer["digest"].split(":")[1]).read_bytes()

    def digests(self) -> list[str]:
        return [self.manifest_digest, self.config_digest] + [layer["digest"] for layer in self.layers]

    def chain_ids(self) -> list[str]:
        chain: list[str] = []
        for layer in self.layers:
            chain.append(layer["diff_id"] if not chain else
                         img.sha256_digest(f"{chain[-1]} {layer['diff_id']}".encode()))
        return chain

    @property
    def compressed_bytes(self) -> int:
        return sum(layer["size"] for layer in self.layers)

    @property
    def uncompressed_bytes(self) -> int:
        return sum(layer["uncompressed"] for layer in self.layers)

    @property
    def file_count(self) -> int:
        return sum(layer["files"] for layer in self.layers)

    def describe(self) -> str:
        return (f"{len(self.layers)} layers, {self.file_count} entries, "
                f"{self.uncompressed_bytes / 1e6:.0f} MB uncompressed, {self.compressed_bytes / 1e6:.0f} MB gzip")


def _cache_key(scale: float) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(img.__file__).read_bytes())
    h.update(repr(scale).encode())
    return h.hexdigest()[:16]


def _load(directory: Path) -> CachedImage:
    meta = json.loads((directory / "image.json").read_text())
    return CachedImage(directory, (directory / "manifest.json").read_bytes(), (directory / "config.json").read_bytes(),
                       meta["layers"])


def build(scale: float) -> CachedImage:
    """The image at `scale` (1.0: ~370 MB uncompressed), from the cache or built now."""
    cache = toolchain.cache_dir() / "bench-images"
    directory = cache / f"rootfs-{_cache_key(scale)}"
    if (directory / "image.json").is_file():
        return _load(directory)
    log(f"building the benchmark image at scale {scale} (cached afterwards in {directory})")
    content = _Content()
    layer_entries, stats, lower = [], [], []
    for index, (name, files, large) in enumerate(scaled_layers(scale)):
        entries, made = _layer_entries(index, name, files, large, content, lower)
        if index == 0:
            lower = made
        layer_entries.append(entries)
        stats.append({"name": name, "files": len(entries),
                      "uncompressed": sum(len(e.data) for e in entries)})
    levels = [1 if name == "assets" else 6 for name, _, _ in LAYERS]
    image = img.build_image(layer_entries, cmd=["/bin/sh"], compresslevels=levels)
    cache.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        (build_dir / "blobs").mkdir()
        layers = []
        for layer, stat in zip(image.layers, stats):
            (build_dir / "blobs" / layer.digest.split(":")[1]).write_bytes(layer.blob)
            layers.append({"digest": layer.digest, "size": layer.size, "diff_id": layer.diff_id, **stat})
        (build_dir / "manifest.json").write_bytes(image.manifest)
        (build_dir / "config.json").write_bytes(image.config)
        (build_dir / "image.json").write_text(json.dumps({"scale": scale, "layers": layers}, indent=1))
        os.rename(build_dir, directory)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return _load(directory)
