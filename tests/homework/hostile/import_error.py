"""Hostile: imports a module that does not exist."""
import numpy_but_faster  # noqa: F401


def quantize_q5_0(x):
    return x
