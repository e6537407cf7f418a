"""Hostile: asks for 64 GB inside a test, then for a 1 TB bytearray."""
import torch


def quantize_q5_0(x):
    return torch.ones(2**34)


def dequantize_q5_0(blocks):
    return bytearray(2**40)
