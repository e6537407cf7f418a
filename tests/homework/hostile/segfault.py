"""Hostile: crashes the interpreter (a segmentation fault) inside a test."""
import ctypes


def quantize_q5_0(x):
    return ctypes.string_at(0)


def dequantize_q5_0(blocks):
    return None
