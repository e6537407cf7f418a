"""Reference solution of the sliding-window attention homework (not shipped to students)."""
import math

import torch
import torch.nn.functional as F

import course_lib


def sliding_window_mask(seq_len, window, start_pos=0):
    "Additive mask (seq_len, start_pos + seq_len): query at position p sees keys p-window+1 .. p."
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    p = torch.arange(seq_len)[:, None] + start_pos             # (seq_len, 1) absolute positions
    j = torch.arange(start_pos + seq_len)[None, :]             # (1, kv_len)
    allowed = (j <= p) & (j > p - window)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def sliding_window_attention(q, k, v, window):
    "Banded attention: each query scores only its last `window` keys. q, k, v: (batch, n_heads, seq, head_dim)."
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    b, h, s, d = q.shape
    w = min(window, s)
    kw = F.pad(k, (0, 0, w - 1, 0)).unfold(2, w, 1)            # (b, h, s, d, w): key i-w+1+c in column c
    vw = F.pad(v, (0, 0, w - 1, 0)).unfold(2, w, 1)            # (b, h, s, d, w)
    scores = torch.einsum("bhsd,bhsdw->bhsw", q, kw) / math.sqrt(d)
    key_pos = torch.arange(s)[:, None] - w + 1 + torch.arange(w)[None, :]   # (s, w)
    scores = scores.masked_fill(key_pos < 0, float("-inf"))    # the padding before position 0
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    return torch.einsum("bhsw,bhsdw->bhsd", probs, vw)


def window_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, window, batch_size=1, bytes_per_value=2):
    "A rolling KV cache keeps only the last `window` positions."
    return course_lib.kv_cache_bytes(n_layers, n_kv_heads, head_dim, min(seq_len, window), batch_size, bytes_per_value)
