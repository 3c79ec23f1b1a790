"""The annotation contract: which volumes a container asks for, and the policy
that decides whether it may have them.

Keys (read from the pod's annotations, as Kubernetes delivers them; the same
key among the container's own CRI annotations counts too):

    volumes.pysnap.io/pod               volumes for every container of the pod
    volumes.pysnap.io/container.<name>  volumes for the container named <name>

Value: a JSON list of objects::

    {"image": "<ref>" | "snapshot": "<name>", "target": "/abs/path",
     "readonly": true, "subpath": "rel/dir"}

Every problem raises ``VolumeRequestError`` naming the annotation and the
reason; the plugin turns it into a failed CreateContainer (fail closed).
"""
from __future__ import annotations

import fnmatch
import json
import posixpath
from dataclasses import dataclass
from typing import Mapping

from pysnap.config import NriConfig

POD_KEY = "volumes.pysnap.io/pod"
CONTAINER_KEY_PREFIX = "volumes.pysnap.io/container."
_FIELDS = {"image", "snapshot", "target", "readonly", "subpath"}


class VolumeRequestError(ValueError):
    """An annotation that is malformed or forbidden by policy."""


@dataclass(frozen=True)
class VolumeRequest:
    source_kind: str  # "image" or "snapshot"
    source: str
    target: str
    readonly: bool = True
    subpath: str = ""
    annotation: str = ""


def container_key(name: str) -> str:
    return CONTAINER_KEY_PREFIX + name


def requested_volumes(
    pod_annotations: Mapping[str, str], container_annotations: Mapping[str, str], container_name: str
) -> list[VolumeRequest]:
    """Every volume the annotations ask for, pod-wide ones first."""
    volumes: list[VolumeRequest] = []
    key = container_key(container_name)
    for annotations, annotation in ((pod_annotations, POD_KEY), (pod_annotations, key), (container_annotations, key)):
        if annotation in annotations:
            if annotations is container_annotations and pod_annotations.get(key) == annotations[annotation]:
                continue  # the same annotation passed through to the container
            volumes.extend(parse_volumes(annotation, annotations[annotation]))
    return volumes


def parse_volumes(annotation: str, value: str) -> list[VolumeRequest]:
    def fail(reason: str) -> VolumeRequestError:
        return VolumeRequestError(f"annotation {annotation}: {reason}")

    try:
        items = json.loads(value)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(items, list):
        raise fail("expected a JSON list of volume objects")
    volumes = []
    for index, item in enumerate(items):
        where = f"volume {index}"
        if not isinstance(item, dict):
            raise fail(f"{where}: expected an object")
        unknown = set(item) - _FIELDS
        if unknown:
            raise fail(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        sources = [k for k in ("image", "snapshot") if k in item]
        if len(sources) != 1:
            raise fail(f'{where}: exactly one of "image" or "snapshot" is required')
        source = item[sources[0]]
        if not isinstance(source, str) or not source:
            raise fail(f'{where}: "{sources[0]}" must be a non-empty string')
        target = item.get("target")
        if not isinstance(target, str) or not target.startswith("/"):
            raise fail(f'{where}: "target" must be an absolute path')
        if posixpath.normpath(target) != target.rstrip("/") and target != "/":
            raise fail(f'{where}: "target" {target!r} is not a normalized path')
        readonly = item.get("readonly", True)
        if not isinstance(readonly, bool):
            raise fail(f'{where}: "readonly" must be true or false')
        subpath = item.get("subpath", "")
        if not isinstance(subpath, str):
            raise fail(f'{where}: "subpath" must be a string')
        subpath = subpath.strip("/")
        if subpath and (".." in subpath.split("/") or "\x00" in subpath):
            raise fail(f'{where}: "subpath" {subpath!r} must stay inside the volume')
        volumes.append(VolumeRequest(sources[0], source, target.rstrip("/") or "/", readonly, subpath, annotation))
    return volumes


def check_policy(volumes: list[VolumeRequest], namespace: str, config: NriConfig) -> None:
    """Raise VolumeRequestError for anything the node's policy forbids."""
    if not volumes:
        return
    first = volumes[0].annotation
    if namespace not in config.namespaces:
        raise VolumeRequestError(f"annotation {first}: containerd namespace {namespace!r} is not allowed volumes")
    if len(volumes) > config.max_volumes:
        raise VolumeRequestError(
            f"annotation {first}: {len(volumes)} volumes requested, at most {config.max_volumes} allowed")
    targets: set[str] = set()
    for volume in volumes:
        where = f"annotation {volume.annotation}"
        for forbidden in config.forbidden_targets:
            if volume.target == forbidden or (forbidden != "/" and volume.target.startswith(forbidden.rstrip("/") + "/")):
                raise VolumeRequestError(f"{where}: target {volume.target} is forbidden (under {forbidden})")
        if volume.target in targets:
            raise VolumeRequestError(f"{where}: target {volume.target} is used by two volumes")
        targets.add(volume.target)
        if not volume.readonly and not config.allow_writable:
            raise VolumeRequestError(f"{where}: writable volumes are disabled on this node (allow_writable)")
        if volume.source_kind == "image" and not any(
            fnmatch.fnmatchcase(volume.source, pattern) for pattern in config.allowed_images
        ):
            raise VolumeRequestError(f"{where}: image {volume.source} is not in allowed_images")
