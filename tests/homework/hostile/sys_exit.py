"""Hostile: exits from inside a test, and hard-exits (os._exit) from another."""
import os
import sys


def quantize_q5_0(x):
    sys.exit(3)


def dequantize_q5_0(blocks):
    os._exit(7)
