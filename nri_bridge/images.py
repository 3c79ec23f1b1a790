"""Reading OCI/Docker image metadata: from an image's target descriptor to the
layers to unpack and the chain IDs of the snapshots they become."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}


class ImageFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def from_json(cls, data: dict) -> "Descriptor":
        try:
            return cls(str(data["mediaType"]), str(data["digest"]), int(data["size"]))
        except (KeyError, TypeError, ValueError):
            raise ImageFormatError(f"malformed descriptor {data!r}") from None


@dataclass(frozen=True)
class Layer:
    blob: Descriptor
    diff_id: str
    chain_id: str


def host_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def pick_manifest(index_json: bytes, architecture: str | None = None) -> Descriptor:
    """The manifest of an index that matches this host (linux/<arch>)."""
    architecture = architecture or host_architecture()
    index = _load(index_json, "image index")
    for entry in index.get("manifests") or []:
        plat = entry.get("platform") or {}
        if plat.get("os", "linux") == "linux" and plat.get("architecture") == architecture:
            return Descriptor.from_json(entry)
    raise ImageFormatError(f"image index has no manifest for linux/{architecture}")


def manifest_parts(manifest_json: bytes) -> tuple[Descriptor, list[Descriptor]]:
    """(config, layers) of an image manifest."""
    manifest = _load(manifest_json, "image manifest")
    if "config" not in manifest:
        raise ImageFormatError("image manifest has no config")
    return Descriptor.from_json(manifest["config"]), [Descriptor.from_json(l) for l in manifest.get("layers") or []]


def diff_ids(config_json: bytes) -> list[str]:
    config = _load(config_json, "image config")
    ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ImageFormatError("image config has no rootfs.diff_ids")
    return ids


def chain_ids(ids: list[str]) -> list[str]:
    """OCI chain IDs: the first is the first diff ID; each next one is
    sha256 of "<previous chain ID> <diff ID>"."""
    chain: list[str] = []
    for diff_id in ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def layers(layer_blobs: list[Descriptor], ids: list[str]) -> list[Layer]:
    if len(layer_blobs) != len(ids):
        raise ImageFormatError(f"manifest lists {len(layer_blobs)} layers but the config {len(ids)} diff IDs")
    return [Layer(blob, diff_id, chain) for blob, diff_id, chain in zip(layer_blobs, ids, chain_ids(ids))]


def _load(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImageFormatError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ImageFormatError(f"{what} is not a JSON object")
    return value
