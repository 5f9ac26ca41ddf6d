"""Counting what nbval compares in the lessons (used by a test and the terminal summary)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_IGNORED_SHARE = 0.20
# One execution of a lesson serves two checks: nbval compares its outputs, and tests/conftest.py then reads the
# kernel's CPU time (CPU_PROBE) before nbval stops it, for tests/test_lesson_cpu_time.py.
# {resolved notebook path: {"start": perf_counter at its first cell, "failed": a cell failed, "cpu": s, "wall": s}}
LESSON_RUNS: dict = {}
CPU_PROBE = """import resource
_self, _kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("CPU_SECONDS", _self.ru_utime + _self.ru_stime + _kids.ru_utime + _kids.ru_stime)"""


@dataclass
class Counts:
    name: str
    code_cells: int
    output_cells: int       # code cells with at least one stored output
    ignored: int            # ... of which nbval does not compare
    unexecuted: int         # code cells never run (no stored reference)

    @property
    def compared(self) -> int:
        return self.output_cells - self.ignored

    @property
    def share(self) -> float:
        return self.ignored / self.output_cells if self.output_cells else 0.0


def lesson_notebooks() -> list[Path]:
    """The lessons nbval compares: the course manifest's, less those waiting in notebooks/pending/."""
    from llmsys_lab import course

    return course.lesson_notebooks(root=ROOT, pending=False)


def is_ignored(cell: dict) -> bool:
    """Exactly nbval's rule: a `# NBVAL_IGNORE_OUTPUT` / `# NBVAL_SKIP` comment line or tag."""
    from nbval.plugin import find_comment_markers, find_metadata_tags

    markers = dict(find_comment_markers("".join(cell.get("source", ""))))
    markers.update(dict(find_metadata_tags(cell.get("metadata", {})) or {}))
    return markers.get("check", True) is False or markers.get("skip", False) is True


def output_counts(path: Path) -> Counts:
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    with_out = [c for c in code if c.get("outputs")]
    return Counts(path.name, len(code), len(with_out), sum(map(is_ignored, with_out)),
                  sum(c.get("execution_count") is None for c in code))


def format_counts(rows: list[Counts]) -> str:
    lines = [f"{'notebook':<32}{'outputs':>8}{'compared':>10}{'ignored':>9}{'share':>8}"]
    for r in rows:
        lines.append(f"{r.name:<32}{r.output_cells:>8}{r.compared:>10}{r.ignored:>9}{r.share:>8.0%}")
    total_out = sum(r.output_cells for r in rows)
    total_ign = sum(r.ignored for r in rows)
    share = total_ign / total_out if total_out else 0.0
    lines.append(f"{'TOTAL':<32}{total_out:>8}{total_out - total_ign:>10}{total_ign:>9}{share:>8.0%}")
    return "\n".join(lines)
