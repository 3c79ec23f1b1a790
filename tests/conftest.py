"""Repository-wide test policy: a skipped test is a failed test (docs/DEVLAYOUT.md)."""

from __future__ import annotations

import pytest


def _as_failure(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped tests count as failures here: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        _as_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Module-level skips (e.g. pytest.importorskip at import time) fail the collection."""
    report = (yield).get_result()
    if report.skipped:
        _as_failure(report)
