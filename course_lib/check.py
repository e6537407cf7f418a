"""Exercise checkers: `course_lib.check.<name>(candidate)` checks your version of `course_lib.<name>`.

Each returns a `CheckResult`: truthy when your candidate passes; print it to see what is wrong.
This file is an index, written by hand: the checkers live in their chapters' modules (generated
from the notebooks), and tests/test_check_index.py fails when one is missing here.
"""
from .tokenizer import check_merge_pair as merge_pair, check_bpe_encode as bpe_encode
from .rmsnorm import check_rms_norm as rms_norm, check_RMSNorm as RMSNorm
from .rmsnorm import check_rms_norm_backward as rms_norm_backward
from .rope import check_precompute_freqs_cis as precompute_freqs_cis, check_apply_rotary_emb as apply_rotary_emb
from .rope import check_permute_hf_to_meta as permute_hf_to_meta
from .attention import check_causal_mask as causal_mask, check_repeat_kv as repeat_kv
from .attention import check_scaled_dot_product as scaled_dot_product, check_KVCache as KVCache
from .feed_forward import check_llama_hidden_dim as llama_hidden_dim, check_FeedForward as FeedForward
from .model import check_TransformerBlock as TransformerBlock, check_count_parameters as count_parameters
from .weights import check_gguf_to_meta_name as gguf_to_meta_name, check_dequantize_q4_1 as dequantize_q4_1
from .weights import check_merge_meta_shards as merge_meta_shards
from .weights import check_dequantize_q8_0 as dequantize_q8_0, check_dequantize_q4_0 as dequantize_q4_0
from .gguf_tokenizer import check_bytes_to_unicode as bytes_to_unicode, check_bpe_word as bpe_word
from .generation import check_top_p_filter as top_p_filter
from .generation import check_apply_repetition_penalty as apply_repetition_penalty
from .generation import check_apply_temperature as apply_temperature, check_top_k_filter as top_k_filter
from .quantization import check_quantize_q8_0 as quantize_q8_0, check_quantize_q4_1 as quantize_q4_1
from .quantization import check_quantize_q4_0 as quantize_q4_0, check_perplexity as perplexity
from .checks.cuda import check_qmatvec_q4_1 as qmatvec_q4_1, check_qmatvec_swiglu as qmatvec_swiglu
from .checks.gpu_decoder import check_add_rms_norm as add_rms_norm
