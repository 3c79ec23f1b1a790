"""Building and running the Go conformance harness (tests/conformance/gosuite).

The harness links containerd 1.7.24's own test suites (snapshots/testsuite,
content/testsuite) with containerd's proxy clients.  It is compiled once in
GOPATH mode against Debian's golang-*-dev sources and cached; it is rebuilt
only when a .go file changes.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from support.toolchain import cache_dir, require

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "conformance" / "gosuite"
MARKER = re.compile(r"^=== (?:RUN|CONT|NAME|PAUSE)\s+(\S+)")
RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(")


def build_harness() -> Path:
    """Path of the compiled suite binary, (re)built with `go test -c` when the sources changed."""
    goroot, gopath = require("PYSNAP_GOROOT"), require("PYSNAP_GOPATH")
    digest = hashlib.sha256(f"{goroot}\n{gopath}\n".encode())
    for src in sorted(HARNESS.glob("*.go")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    out_dir = cache_dir() / "conformance"
    binary, stamp = out_dir / "gosuite.test", out_dir / "gosuite.test.sha256"
    if binary.is_file() and stamp.is_file() and stamp.read_text() == digest.hexdigest():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, GO111MODULE="off", GOROOT=goroot, GOPATH=gopath, GOFLAGS="", GOTOOLCHAIN="local",
        GOCACHE=str(cache_dir() / "gocache"), CGO_ENABLED="0",
    )
    tmp = binary.with_suffix(".tmp")
    proc = subprocess.run(
        [f"{goroot}/bin/go", "test", "-c", "-o", str(tmp), "."],
        cwd=HARNESS, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"go test -c failed in {HARNESS}:\n{proc.stdout}{proc.stderr}"
    tmp.replace(binary)
    stamp.write_text(digest.hexdigest())
    return binary


def parse(output: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(test name -> PASS/FAIL/SKIP, test name -> its output lines; "" holds unattributed lines)."""
    results: dict[str, str] = {}
    logs: dict[str, list[str]] = defaultdict(list)
    current = ""
    for line in output.splitlines():
        if m := MARKER.match(line):
            current = m[1]
        elif m := RESULT.match(line):
            results[m[2]] = m[1]
            current = ""
        else:
            logs[current].append(line)
    return results, logs


def run_suite(suite: str, subtests: tuple[str, ...], workdir: Path, *, needs_root: bool) -> None:
    """Run Go test ``suite`` and fail, with each failing subtest's output, unless every
    one of ``subtests`` passed."""
    if needs_root and os.geteuid() != 0:
        pytest.fail(f"{suite} mounts filesystems: run as root")
    pysnap = os.environ.get("PYSNAP_BIN") or str(REPO / ".venv/bin/pysnap")
    assert os.access(pysnap, os.X_OK), f"PYSNAP_BIN={pysnap} is not an executable (run scripts/provision.sh)"
    argv = [str(build_harness()), "-test.v", f"-test.run=^{suite}$", "-test.timeout=8m"]
    if needs_root:
        argv.append("-test.root")
    proc = subprocess.run(argv, cwd=workdir, env=dict(os.environ, PYSNAP_BIN=pysnap),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=560)
    (workdir / "go-test.log").write_text(proc.stdout)
    results, logs = parse(proc.stdout)
    bad = [n for n in subtests if results.get(f"{suite}/{n}") != "PASS"]
    if bad or proc.returncode != 0:
        report = [f"{len(bad)}/{len(subtests)} subtests of {suite} did not pass (exit {proc.returncode}): "
                  f"{' '.join(bad)}"]
        for n in bad:
            report += [f"----- {n}: {results.get(f'{suite}/{n}', 'NO RESULT')}", *logs[f"{suite}/{n}"][-80:]]
        report += ["----- other output (tail)", *(logs[suite] + logs[""])[-40:]]
        report.append(f"full log: {workdir / 'go-test.log'}")
        pytest.fail("\n".join(report), pytrace=False)
