"""OCI digests (``<algorithm>:<lowercase hex>``) and their incremental hashers."""
from __future__ import annotations

import hashlib
import re

from pysnap.errors import InvalidArgument

HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
CANONICAL = "sha256"


def parse_digest(digest: str) -> tuple[str, str]:
    """Split and validate a digest; InvalidArgument names what is wrong."""
    algorithm, sep, hex_part = digest.partition(":")
    if not sep or not algorithm or not hex_part:
        raise InvalidArgument(f'"{digest}" failed validation: invalid checksum digest format')
    if algorithm not in HEX_LENGTH:
        raise InvalidArgument(f'"{digest}" failed validation: unsupported digest algorithm')
    if len(hex_part) != HEX_LENGTH[algorithm] or not _HEX.fullmatch(hex_part):
        raise InvalidArgument(f'"{digest}" failed validation: invalid checksum digest length or characters')
    return algorithm, hex_part


def new_hasher(algorithm: str = CANONICAL) -> "hashlib._Hash":
    return hashlib.new(algorithm)


def digest_of(hasher: "hashlib._Hash") -> str:
    return f"{hasher.name}:{hasher.hexdigest()}"
