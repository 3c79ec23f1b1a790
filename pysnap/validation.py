"""Input checks and label-update rules shared by the daemons (failures are InvalidArgument)."""
from __future__ import annotations

from typing import Mapping, Sequence

from .errors import InvalidArgument

MAX_LABEL_SIZE = 4096  # containerd: len(key) + len(value) of one label
MAX_KEY_SIZE = 4096


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {key[:10]}"
            )


def validate_name(name: str, what: str = "key") -> None:
    """A snapshot key/name is opaque text (containerd's contain ``/``, spaces and
    ``:``), but never empty, never NUL, never a ``..`` path segment, never huge."""
    if not name:
        raise InvalidArgument(f"{what} must not be empty")
    if "\x00" in name:
        raise InvalidArgument(f"{what} {name!r} contains a NUL byte")
    if ".." in name.split("/"):
        raise InvalidArgument(f"{what} {name!r} contains a '..' path segment")
    if len(name.encode()) > MAX_KEY_SIZE:
        raise InvalidArgument(f"{what} is longer than {MAX_KEY_SIZE} bytes")


def updated_labels(current: Mapping[str, str], given: Mapping[str, str], fieldpaths: Sequence[str],
                   what: str) -> dict[str, str]:
    """containerd's Update rule for labels.

    No field paths, or ``labels``: the labels become ``given``.  ``labels.<key>``:
    that one key takes its value from ``given`` (absent or empty deletes it).
    Any other path is refused; ``what`` names the object in that message.
    """
    validate_labels(given)
    for path in fieldpaths:
        if path != "labels" and not path.startswith("labels."):
            raise InvalidArgument(f'cannot update "{path}" field on {what}')
    if not fieldpaths:
        return {k: v for k, v in given.items() if v}
    labels = dict(current)
    for path in fieldpaths:
        if path == "labels":
            labels = {k: v for k, v in given.items() if v}
            continue
        key = path[len("labels."):]
        if given.get(key):
            labels[key] = given[key]
        else:
            labels.pop(key, None)
    return labels
