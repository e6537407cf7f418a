"""Buggy: dequantize returns a flat (n*32,) tensor instead of (n, 32); quantize is right."""
import torch


def quantize_q5_0(x):
    imax = x.abs().argmax(dim=1, keepdim=True)
    d = x.gather(1, imax) / -16
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = (x * inv + 16.5).trunc().clamp(0, 31).to(torch.int64)
    qs = ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).to(torch.uint8)
    qh = ((q >> 4) << torch.arange(32)).sum(dim=1, keepdim=True)
    qh = ((qh >> (8 * torch.arange(4))) & 0xFF).to(torch.uint8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), qh, qs], dim=1)


def dequantize_q5_0(blocks):
    d = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
    qh = (blocks[:, 2:6].to(torch.int64) << (8 * torch.arange(4))).sum(dim=1, keepdim=True)
    high = (qh >> torch.arange(32)) & 1
    qs = blocks[:, 6:].to(torch.int64)
    low = torch.cat([qs & 0xF, qs >> 4], dim=1)
    return (d * ((low | (high << 4)) - 16).to(torch.float32)).flatten()     # bug: flat
