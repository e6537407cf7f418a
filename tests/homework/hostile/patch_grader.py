"""Hostile (issue 13): replaces the grader's run_test with one that passes everything, in its own process."""
import course_lib.grading

course_lib.grading.run_test = lambda *args, **kwargs: (True, "")


def quantize_q5_0(x):
    raise NotImplementedError


def dequantize_q5_0(blocks):
    raise NotImplementedError
