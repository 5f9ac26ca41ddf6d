"""A measured number in a lesson's prose is printed by the lesson's code (the drift rule).

Stored outputs change whenever the lessons are run again on the GPU; prose typed from an earlier run
then contradicts the table beside it. This test scans each lesson's markdown for numbers with units
(ms, µs, s, GB/s, TB/s, GB, MB, x, %, tokens/s, ...) and looks for each in the lesson's stored outputs:
the same value at the precision the prose writes it (prose "34 ms" is found in an output "33.771 ms").
What is found nowhere is listed. Constants (a GPU's datasheet bandwidth, a link speed), slide quotes and
numbers a sentence derives by arithmetic the reader can redo are allowed below, each with its reason.
A sentence that must stay true whatever the run avoids measured numbers (or prints them).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmsys_lab import course

ROOT = Path(__file__).resolve().parent.parent
LESSONS = course.lesson_notebooks(root=ROOT, pending=False)       # those with stored GPU outputs

UNITS = r"(?:ms|µs|us|ns|s|GB/s|TB/s|MB/s|Gb/s|GiB|GB|MiB|MB|KB|TFLOP/s|TFLOPs|tokens/s|tok/s|rps)"
# a number with a unit after a space or attached; a ratio written "7.2x" / "7×"; a percentage "61%"
NUMBER = re.compile(rf"(?<![\w.^{{/])(\d[\d,]*(?:\.\d+)?)(?:\s?({UNITS})(?![\w/])|(x|×)(?![\w\d])|\s?(%))")
OUTPUT_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
OUTPUT_RATIO = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)\s?[x×](?![\w\d])|[x×]\s?(\d[\d,]*(?:\.\d+)?)(?![\w\d.])")

# Numbers in prose that are not measurements of this lesson's outputs: {lesson stem: {token: why}}.
ALLOWED: dict[str, dict[str, str]] = {
    "07_performance": {
        "4.2 TB/s": "exercise 1's given bandwidth (H100-class HBM), a constant",
        "61%": "the lecture slide's runtime share (lecture.get('operator_classes'), printed in section 1)",
        "99.8%": "the lecture slide's FLOP share (printed in section 1)",
        "90%": "exercise 3's target occupancy",
    },
    "08_parallelism": {
        "80 GB": "an A100's memory, a constant",
        "141 GB": "an H200's memory, a constant",
        "450 GB/s": "NVLink 4 (H100) per direction, a datasheet constant",
        "900 GB/s": "NVLink 4 (H100), both directions together, a datasheet constant",
        "50 GB/s": "a 400 Gb/s InfiniBand link, a constant",
        "400 Gb/s": "an InfiniBand link's speed, a constant",
        "10%": "the prediction question's threshold",
        "25 MB": "PyTorch DDP's default bucket size (bucket_cap_mb), a constant",
    },
    "09_moe": {
        "60%": "a hypothetical router in the prediction question",
        "50%": "the most one expert can take of top-2 assignments (derived in the text)",
        "45%": "a hypothetical router in the prediction question",
        "12.5%": "1/8 of the assignments, derived in the text",
        "15.6%": "1.25 x 12.5%, derived in the text",
        "29.4%": "45 - 15.6, derived in the text",
        "450 GB/s": "NVLink 4 (H100) per direction, a datasheet constant",
        "50 GB/s": "a 400 Gb/s InfiniBand link, a constant",
        "400 Gb/s": "an InfiniBand link's speed, a constant",
        "141 GB": "an H200's memory, a constant",
        "989 TFLOP/s": "an H200's dense bf16 peak, a datasheet constant",
    },
    "10_speculative_decoding": {
        "4.8 TB/s": "an H200's HBM bandwidth, a datasheet constant",
        "989 TFLOP/s": "an H200's dense bf16 peak, a datasheet constant",
    },
}


def cells(path: Path):
    return json.loads(path.read_text())["cells"]


def output_text(nb_cells) -> str:
    parts = []
    for c in nb_cells:
        for o in c.get("outputs", []):
            if "text" in o:
                parts.append("".join(o["text"]))
            elif "data" in o:
                parts.append("".join(o["data"].get("text/plain", "")))
    return "\n".join(parts)


def output_values(text: str) -> list[float]:
    out = []
    for m in OUTPUT_NUMBER.finditer(text):
        try:
            out.append(float(m.group(0).replace(",", "")))
        except ValueError:
            pass
    return out


def output_ratios(text: str) -> list[float]:
    """Numbers printed as ratios: "7.19x", "x 7.19" (a table's "x12.21"), "3 ×"."""
    return [float((m.group(1) or m.group(2)).replace(",", "")) for m in OUTPUT_RATIO.finditer(text)]


def prose_numbers(md: str):
    """(token as written, value, decimals) for each number with a unit in a markdown text."""
    md = re.sub(r"`[^`]*`", " ", md)                       # code spans are names, not measurements
    md = re.sub(r"\$[^$]*\$", " ", md)                     # LaTeX: formulas, not measurements
    for m in NUMBER.finditer(md):
        num = m.group(1).rstrip(",")
        unit = m.group(2) or m.group(3) or m.group(4)
        token = f"{num}{'' if unit in ('x', '×', '%') else ' '}{unit}"
        decimals = len(num.split(".")[1]) if "." in num else 0
        yield token, float(num.replace(",", "")), decimals


def found(value: float, decimals: int, values: list[float], percent: bool) -> bool:
    candidates = values + ([100 * v for v in values] if percent else [])
    return any(round(v, decimals) == value for v in candidates)


def unprinted(path: Path) -> list[str]:
    nb = cells(path)
    text = output_text(nb)
    values, ratios = output_values(text), output_ratios(text)
    allowed = ALLOWED.get(path.stem, {})
    missing = []
    for c in nb:
        if c["cell_type"] != "markdown":
            continue
        for token, value, decimals in prose_numbers("".join(c["source"])):
            # a ratio must be printed as a ratio (any number would match small ones by chance)
            pool = ratios if token[-1] in "x×" else values
            if token in allowed or found(value, decimals, pool, token.endswith("%")):
                continue
            missing.append(f"cell {c.get('id')}: {token}")
    return missing


def test_the_scanner_finds_numbers_with_units():
    md = "takes 13.6 ms, about **7.2x** faster, 61% of the time, 4.8 TB/s; `x = 5 ms` and $3 ms$ are not prose"
    assert [t for t, _, _ in prose_numbers(md)] == ["13.6 ms", "7.2x", "61%", "4.8 TB/s"]
    text = "engine 13.626 ms | 7.19x | share 0.61 | 100 tokens |    4.590 ms x12.21"
    values, ratios = output_values(text), output_ratios(text)
    assert found(13.6, 1, values, False) and found(61, 0, values, True) and not found(14.7, 1, values, False)
    assert found(7.2, 1, ratios, False) and found(12, 0, ratios, False) and not found(100, 0, ratios, False)


@pytest.mark.parametrize("path", [p for p in LESSONS if p.stem[:2] in ("07", "08", "09", "10")], ids=lambda p: p.stem)
def test_measured_numbers_in_prose_are_printed(path):
    missing = unprinted(path)
    assert not missing, (f"{path.name}: numbers with units in the prose that no output of the lesson prints "
                         "(print them from the results, reword, or allow-list a constant with its reason):\n  "
                         + "\n  ".join(missing))
