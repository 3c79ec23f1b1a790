"""containerd 1.7.24's content/testsuite against `pysnap serve content`, one fresh pysnap
process per case (semantics.md D2): directly through containerd's content proxy client, and
through containerd's metadata layer in front of that proxy (as containerd uses a content proxy)."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.gosuite import run_suite

pytestmark = pytest.mark.conformance

CONTENT_SUITE = (
    "Writer", "UpdateStatus", "CommitExists", "Resume", "ResumeTruncate", "ResumeDiscard", "ResumeCopy",
    "ResumeCopySeeker", "ResumeCopyReaderAt", "SmallBlob", "Labels", "CommitErrorState",
)
NAMESPACE_SUITES = ("CrossNamespaceAppend", "CrossNamespaceShare", "CrossNamespaceIsolate", "SharedNamespaceIsolate")


def test_every_case_of_containerds_content_suite_passes_through_the_proxy_client(tmp_path: Path) -> None:
    run_suite("TestContentSuite", CONTENT_SUITE, tmp_path, needs_root=False)


def test_every_content_case_passes_through_containerds_metadata_layer(tmp_path: Path) -> None:
    run_suite("TestContentThroughMetadata", CONTENT_SUITE + NAMESPACE_SUITES, tmp_path, needs_root=False)
