"""Shared by tests/test_lab.py and tests/test_lab_solutions.py: build and run the lab edition (tools/make_lab.py)."""
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_lab  # noqa: E402

SOURCES = make_lab.sources()
IDS = [p.stem for p in SOURCES]


def checker_outputs(nb) -> list:
    "The text each `lab-check` cell printed, in order."
    return ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells if "lab-check" in make_lab.tags(c)]


def execute(nb) -> None:
    "Run a lab notebook top to bottom in a fresh kernel, from notebooks/lab/ as a student would."
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(make_lab.LAB)}}).execute()
