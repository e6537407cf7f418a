"""course_lib: the library the course's notebooks build, one chapter at a time.

This file is an index, written by hand: it only re-exports the public API. Every other module
except `check.py` is generated from `notebooks/` by nbdev; edit the notebook, not the module.
"""
__version__ = "0.1.0"

# from .tokenizer import BPE, Tokenizer  (added when chapter 01 lands)
from .rmsnorm import RMSNorm
from .rope import (precompute_freqs_cis, apply_rotary_emb, precompute_cos_sin, rotate_half,
                   apply_rotary_emb_hf, permute_meta_to_hf, permute_hf_to_meta)
from .attention import causal_mask, scaled_dot_product, repeat_kv, kv_cache_bytes, KVCache, Attention
from .feed_forward import llama_hidden_dim, FeedForward
from .model import ModelArgs, PRESETS, TransformerBlock, Transformer, count_parameters, args_from_hf_config, from_hf
