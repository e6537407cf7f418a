"""Buggy: the window holds W+1 keys (j >= p - W instead of j > p - W), and the cache size ignores the window."""
import math

import torch

import course_lib


def sliding_window_mask(seq_len, window, start_pos=0):
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    p = torch.arange(seq_len)[:, None] + start_pos
    j = torch.arange(start_pos + seq_len)[None, :]
    allowed = (j <= p) & (j >= p - window)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def sliding_window_attention(q, k, v, window):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores + sliding_window_mask(q.shape[2], window)
    return torch.softmax(scores, dim=-1) @ v


def window_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, window, batch_size=1, bytes_per_value=2):
    return course_lib.kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch_size, bytes_per_value)
