"""Hostile: quantize never returns."""


def quantize_q5_0(x):
    while True:
        pass


def dequantize_q5_0(blocks):
    while True:
        pass
