"""Hostile (issue 13): prints without end inside a test."""


def quantize_q5_0(x):
    line = "spam " * 2000
    while True:
        print(line)


def dequantize_q5_0(blocks):
    return blocks
