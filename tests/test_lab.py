"""The lab edition (notebooks/lab/, issue 16): generated, in sync, free of solutions, and runnable with its stubs.

tests/test_lab_solutions.py runs the same notebooks with the reference solutions put back.
"""
import re

import nbformat
import pytest

from lab_support import IDS, SOURCES, checker_outputs, execute, make_lab


def test_every_lab_notebook_is_generated_and_in_sync():
    assert SOURCES, "no reading notebook has cells tagged `lab`"
    assert make_lab.write_all(check=True) == [], "run: python tools/make_lab.py"


def _solution_lines(path) -> set:
    "Code lines that appear only inside a solution region of the reading notebook's lab cells."
    inside, outside = set(), set()
    for cell in nbformat.read(path, as_version=4).cells:
        if "lab" not in make_lab.tags(cell) or cell.cell_type != "code":
            continue
        in_region = False
        for line in cell.source.split("\n"):
            stripped = line.strip()
            if stripped in make_lab.MARKERS:
                in_region = stripped == make_lab.MARKERS[0]
            elif stripped and not stripped.startswith("#"):
                (inside if in_region else outside).add(stripped)
    return inside - outside


@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_lab_notebook_holds_no_solution_code(path):
    lab = nbformat.read(make_lab.LAB / path.name, as_version=4)
    text = "\n".join(c.source for c in lab.cells)
    solution = _solution_lines(path)
    assert solution, f"{path.name} has lab cells but no solution region"
    leaked = sorted(line for line in solution if line in {l.strip() for l in text.split("\n")})
    assert not leaked, f"solution code in notebooks/lab/{path.name}: {leaked}"
    assert "BEGIN SOLUTION" not in text and "#| export" not in text


@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_each_stub_keeps_its_signature_and_is_followed_by_its_checker(path):
    lab = nbformat.read(make_lab.LAB / path.name, as_version=4)
    code = [c for c in lab.cells if c.cell_type == "code"]
    stubs = [i for i, c in enumerate(code) if "raise NotImplementedError()" in c.source]
    assert stubs, f"notebooks/lab/{path.name} asks for nothing"
    for i in stubs:
        assert re.search(r"^\s*(def|class) \w+", code[i].source, re.M), code[i].source[:200]
        assert i + 1 < len(code) and "lab-check" in make_lab.tags(code[i + 1]), \
            f"the stub cell is not followed by a checker cell:\n{code[i].source[:300]}"


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_lab_notebook_runs_top_to_bottom_with_its_stubs(path):
    nb = nbformat.read(make_lab.LAB / path.name, as_version=4)
    execute(nb)                                     # raises CellExecutionError if a cell fails
    outputs = checker_outputs(nb)
    assert outputs and all(o.startswith("❌") for o in outputs), outputs
    assert any("NotImplementedError" in o for o in outputs), outputs
