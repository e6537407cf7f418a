"""Chapter 11 (serving many requests): batched generation with padding masks, a paged KV cache with
continuous batching (the Engine), speculative decoding, and an OpenAI-compatible HTTP server.

This file is an index, written by hand: every module it imports is generated from the notebooks
(11_batching: batch, paged_cache, engine; 11b_speculative: speculative; 11c_server: server).
The model's modules know nothing of serving: serving imports the model, never the reverse.
"""
from .batch import left_pad, position_ids, padding_causal_mask, batch_logits, generate_batch
from .paged_cache import slot_indices, PagedKVCache
from .engine import Request, StepBatch, build_step, paged_attention, paged_logits, Engine
from .speculative import (speculative_generate, SpeculativeStats, layer_skip_draft, verify_greedy, verify_sampled,
                          residual_distribution, expected_tokens_per_forward)
from .server import (BadRequest, openai_error, sse_event, sampling_from_request, TextStream, parse_request,
                     EngineLoop, create_app, ServerThread, serve)
