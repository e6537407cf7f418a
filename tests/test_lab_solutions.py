"""The lab edition with the reference solutions put back into its stubs: every checker passes (issue 16).

A separate file from tests/test_lab.py so that pytest-xdist (--dist loadfile) runs the two on different workers.
"""
import pytest

from lab_support import IDS, SOURCES, checker_outputs, execute, make_lab


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_every_checker_passes_with_the_reference_solutions(path):
    nb = make_lab.lab_notebook(path, clear=False)
    execute(nb)
    outputs = checker_outputs(nb)
    assert outputs and all(o.startswith("✅") for o in outputs), "\n".join(outputs)
