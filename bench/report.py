"""docs/benchmarks.md: a header with the machine, then one section per benchmark.

Each section sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` and states its own date and mode, so
`--only NAME` refreshes that section and keeps the others from their earlier run.
"""

from __future__ import annotations

import re
from pathlib import Path

from .common import REPO, Section

DOC = REPO / "docs" / "benchmarks.md"
ORDER = ("snapshotter", "content", "nri")

HEADER = """# Benchmarks

Written by `bench/` — refresh with `.venv/bin/python -m bench.run` from the repository root (`--quick` for
smaller sizes, `--only snapshotter|content|nri` for one section).  Every number compares pysnap with containerd's
built-in plugin measured in the same run on the same machine; nothing here is a test and no threshold is asserted.
"""


def render_section(section: Section, when: str, mode: str, machine: dict[str, str], seconds: float,
                   load: tuple[float, float]) -> str:
    lines = [f"<!-- bench:{section.name} -->", f"## {section.heading}", "",
             f"Measured {when}, {mode} mode, in {seconds:.0f} s (1-minute load average {load[0]:.2f} before, "
             f"{load[1]:.2f} after), on: " + "; ".join(f"{k} {v}" for k, v in machine.items()) + ".", ""]
    lines += [f"- {m}" for m in section.method]
    for table in section.tables:
        lines += ["", table.markdown()]
    if section.findings:
        lines += ["", "Notes:", ""] + [f"- {f}" for f in section.findings]
    lines += ["", f"<!-- /bench:{section.name} -->"]
    return "\n".join(lines)


def _existing_sections(text: str) -> dict[str, str]:
    found = {}
    for match in re.finditer(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", text, re.S):
        found[match.group(1)] = match.group(0)
    return found


def write(rendered: dict[str, str], machine: dict[str, str], when: str) -> Path:
    """Replace the sections in `rendered` (name -> markdown), keep the others, rewrite the header."""
    sections = _existing_sections(DOC.read_text()) if DOC.exists() else {}
    sections.update(rendered)
    machine_lines = "\n".join(f"- {k}: {v}" for k, v in machine.items())
    body = [HEADER, f"Last run: {when}. Machine of the last run:\n\n{machine_lines}\n"]
    body += [sections[name] + "\n" for name in ORDER if name in sections]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(body))
    return DOC
