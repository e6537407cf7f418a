"""The autograder (course_lib.grading, `python -m course_lib grade`): reference solutions get full marks,
buggy submissions partial marks with the right feedback, and hostile ones are reported without
stopping the run."""
import csv
import json
from pathlib import Path

import pytest

import course_lib.cli as cli
from course_lib import grading

HW = Path(__file__).parent / "homework"
SOLUTIONS, BUGGY, HOSTILE = HW / "solutions", HW / "buggy", HW / "hostile"


def _rows(result):
    return {name: (got, feedback) for name, got, points, feedback in result.rows}


@pytest.fixture(scope="module")
def graded():
    "Each homework's reference solution and buggy submissions, graded once for the whole file."
    return {hw: grading.grade(hw, [SOLUTIONS / f"{hw}.py"] + sorted(BUGGY.glob(f"{hw}_*.py")), timeout=90)
            for hw in grading.HOMEWORKS}


@pytest.mark.parametrize("hw", ["attention", "decoding", "quantization"])
def test_reference_solutions_get_full_marks(graded, hw):
    solution = graded[hw][0]
    assert solution.student == hw
    assert solution.score == solution.max_score == 10, solution.feedback
    assert solution.feedback == "all tests passed"


def test_buggy_attention_loses_the_window_tests(graded):
    r = _rows(graded["attention"][1])
    assert graded["attention"][1].score == 2
    assert r["mask"][0] == 0 and "expected -inf" in r["mask"][1] and "exactly W keys" in r["mask"][1]
    assert r["mask_long_window"][0] == 1 and r["mask_bad_window"][0] == 1
    assert "min(seq_len, W)" in r["cache_bytes"][1]


def test_buggy_decoding_gets_partial_marks(graded):
    result = graded["decoding"][1]
    r = _rows(result)
    assert result.student == "decoding_presence_only" and result.score == 3
    assert "typical_filter(probs (50,), mass=0.9) differs" in r["typical"][1]
    assert "frequency × count" in r["penalty"][1]
    assert "not in the typical set" in r["generate"][1]
    assert r["typical_bad_mass"][0] == 1 and r["generate_seed"][0] == 1


def test_buggy_quantization_feedback_names_the_byte_and_the_shape(graded):
    bit_order, wrong_shape = graded["quantization"][1:]
    assert bit_order.score == 3 and "byte 2 differs, in qh (5th bits)" in _rows(bit_order)["quantize"][1]
    assert wrong_shape.score == 5
    assert "has shape (2176,), expected (68, 32)" in _rows(wrong_shape)["dequantize"][1]


def test_hostile_submissions_are_reported_and_the_run_goes_on(tmp_path):
    old = ("crash_on_import", "import_error", "infinite_loop", "huge_allocation", "sys_exit", "segfault")
    files = [HOSTILE / f"{name}.py" for name in old] + [SOLUTIONS / "quantization.py"]
    results = {r.student: r for r in grading.grade("quantization", files, timeout=6, memory_mb=2048)}
    assert results["quantization"].score == 10                       # graded after all the hostile ones
    for name in ("crash_on_import", "import_error", "infinite_loop", "huge_allocation", "sys_exit", "segfault"):
        assert results[name].score == 0, name
    assert "did not load: raised RuntimeError: boom while loading" in results["crash_on_import"].feedback
    assert "import failed: ModuleNotFoundError: No module named 'numpy_but_faster'" in results["import_error"].feedback
    assert "time limit exceeded (6 s) in test quantize" in results["infinite_loop"].feedback
    assert "ran out of memory (the limit is 2048 MB)" in _rows(results["huge_allocation"])["quantize"][1]
    assert "ran out of memory" in _rows(results["huge_allocation"])["dequantize"][1]      # MemoryError too
    exits = _rows(results["sys_exit"])
    assert "called sys.exit(3)" in exits["quantize"][1] and "exited with code 7" in exits["dequantize"][1]
    assert "killed by SIGSEGV in test quantize" in results["segfault"].feedback
    assert "not run: quantize_edges, dequantize, round_trip" in results["infinite_loop"].feedback


def test_notebook_submission_skips_feedback_cells_and_magics(tmp_path):
    source = (SOLUTIONS / "attention.py").read_text()
    cells = [source, "%timeit 1 + 1\n!ls", "# not graded\nwhile True: pass"]
    nb = {"cells": [{"cell_type": "markdown", "source": "# homework"}] +
                   [{"cell_type": "code", "source": c.splitlines(True), "outputs": []} for c in cells],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "ada.ipynb"
    path.write_text(json.dumps(nb))
    code = grading.extract_code(path)
    assert "while True" not in code and "pass  # %timeit" in code
    result = grading.grade_submission("attention", path, timeout=30)
    assert result.student == "ada" and result.score == 10, result.feedback


def test_in_process_check_reports_stubs_without_raising():
    def quantize_q5_0(x):
        raise NotImplementedError
    report = grading.check("quantization", {"quantize_q5_0": quantize_q5_0})
    text = str(report)
    assert report.score == 0 and "not written yet" in text and "defines no `dequantize_q5_0`" in text


def test_grade_command_prints_the_table_and_writes_the_csv(tmp_path, capsys):
    out = tmp_path / "grades.csv"
    assert cli.main(["grade", "quantization", str(SOLUTIONS / "quantization.py"), str(HOSTILE / "sys_exit.py"),
                     str(tmp_path / "missing.py"), "--csv", str(out), "--timeout", "20"]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "quantize (3)" in table and "total (10)" in table and "sys_exit" in table
    assert "grading quantization: 100%" in captured.err and "3/3" in captured.err   # the progress bar
    rows = list(csv.DictReader(out.open()))
    assert [r["student"] for r in rows] == ["quantization", "sys_exit", "missing"]
    assert [r["score"] for r in rows] == ["10", "0", "0"] and rows[0]["feedback"] == "all tests passed"
    assert "sys.exit(3)" in rows[1]["feedback"] and "does not exist" in rows[2]["feedback"]


def test_grade_command_rejects_an_unknown_homework(capsys):
    assert cli.main(["grade", "sorting", "x.py"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown homework 'sorting'") and err.count("\n") == 1


def test_the_shipped_starter_notebook_grades_as_stubs():
    starter = Path(__file__).parents[1] / "notebooks" / "homework" / "hw3_q5_0_quantization.ipynb"
    result = grading.grade_submission("quantization", starter, timeout=60)
    assert result.student == "hw3_q5_0_quantization" and result.score == 0
    assert all(fb == "not written yet: still raises NotImplementedError" for *_, fb in result.rows)
