"""Hostile (issue 13): answers with the course's reference solution, read from the course's tests/ folder.

Where that folder is readable (in the student's own notebook, say) this gets full marks."""
from pathlib import Path

import course_lib

SOLUTION = Path(course_lib.__file__).resolve().parents[1] / "tests" / "homework" / "solutions" / "quantization.py"


def _solution():
    ns = {}
    exec(SOLUTION.read_text(), ns)
    return ns


def quantize_q5_0(x):
    return _solution()["quantize_q5_0"](x)


def dequantize_q5_0(blocks):
    return _solution()["dequantize_q5_0"](blocks)
