"""Build a Llama-style language model from scratch, one notebook at a time: the course's companion library

Modules:

- `course_lib.check`: Exercise checkers: `course_lib.check.<name>(candidate)` checks your version of `course_lib.<name>`.
- `course_lib.cuda.emulator.cupy_api`: The part of CuPy's API that chapter 09 uses, on top of the CPU emulator of CUDA C."""

# This file is an index, written by hand (nbdev writes only the docstring above): it re-exports
# the public API that homework and graders use. Every other module except check.py is generated
# from notebooks/ by nbdev: edit the notebook, not the module.
__version__ = "0.1.0"

from .tokenizer import get_pair_counts, merge_pair, BPE, train_sentencepiece, Tokenizer     # 01
from .rmsnorm import rms_norm, RMSNorm                                                       # 02
from .rope import (precompute_freqs_cis, apply_rotary_emb, precompute_cos_sin, rotate_half,  # 03
                   apply_rotary_emb_hf, permute_meta_to_hf, permute_hf_to_meta)
from .attention import causal_mask, scaled_dot_product, repeat_kv, kv_cache_bytes, KVCache, Attention  # 04
from .feed_forward import llama_hidden_dim, FeedForward                                      # 05
from .model import (ModelArgs, PRESETS, TransformerBlock, Transformer, count_parameters,    # 06
                    args_from_hf_config, from_hf)
from .decoding import Decoder, validate_decode_input                                           # 06
from .gguf_format import read_gguf                                                          # 07
from .weights import (fetch_smollm2, FetchError, load_gguf_model,              # 07
                      load_meta_checkpoint, load_hf_checkpoint)
from .gguf_tokenizer import (GGUFTokenizer, bytes_to_unicode, pretokenize, bpe_word,        # 07b
                             render_chat_template, load_gguf, load_smollm2)
from .generation import (METHODS, decoder_device, top_k_filter, top_p_filter, min_p_filter, next_token_probs,  # 07c
                         sample_next_token, apply_repetition_penalty, GenerationStats, generate_tokens,
                         generate_stream, generate, sampling_table)
from .fused import fuse_model, is_fused, FusedAttention, FusedFeedForward                   # 07c
from .cli import fit_conversation                                                           # 07d
from .quant_formats import SCHEMES, quantize, dequantize                                    # 08
from .quant_model import (QuantLinear, QuantEmbedding, quantize_model, weight_bytes, save_quantized,
                          load_quantized, export_gguf)
from .evaluation import perplexity, logit_metrics, compare_models
from .fast_cpu import Int4Matmul, FastQuantModel                                            # 08b
from .c_step import CDecodeStep, CCompilerError
from .cuda import (CudaQuantModel, Backend, get_backend, gpu_available, backend_status, decode_source,  # 09
                   repack_blocks, unpack_blocks, QuantMatrix, upload_matrix, peak_bandwidth,
                   decode_bytes_per_token, tokens_per_second_bound, compile_ptx, plot_roofline)
from .serving import generate_batch, padding_causal_mask, PagedKVCache, Engine                 # 11
from .serving import speculative_generate, SpeculativeStats, layer_skip_draft                  # 11b
from .serving import create_app, ServerThread                                               # 11c
from .parallel import (tensor_parallel_logits, tensor_parallel_generate, shard_model,          # 12
                       ColumnParallelLinear, RowParallelLinear)
from .moe import top_k_routing, MoEFeedForward, load_balancing_loss, active_parameters        # 12b
from .training import (log_softmax, cross_entropy, adamw_step, AdamW, cosine_schedule, clip_grad_norm,  # 13
                       TokenData, text_data, init_weights, TrainLog, evaluate_loss, save_checkpoint,
                       load_checkpoint, train, bits_per_character, sample_text, train_text_model)
from .training.prune import (magnitude_mask, magnitude_prune, importance_scores, kv_group_importance,  # 13b
                             remove_kv_groups, remove_ffn_channels, remove_layers, prune_model)
from .training.distill import kd_loss, distillation_loss, recovered_fraction                  # 13b
from . import check
