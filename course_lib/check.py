"""Exercise checkers: `course_lib.check.<name>(candidate)` checks your version of `course_lib.<name>`.

Each returns a `CheckResult`: truthy when your candidate passes; print it to see what is wrong.
This file is an index, written by hand: the checkers live in `course_lib.checks.<chapter>` (generated
from the checkers section of each notebook), and tests/test_check_index.py fails when one is missing here.
"""
from .checks.tokenizer import check_merge_pair as merge_pair, check_bpe_encode as bpe_encode                  # 01
from .checks.tokenizer import check_decode_complete as decode_complete
from .checks.rmsnorm import check_rms_norm as rms_norm, check_RMSNorm as RMSNorm                              # 02
from .checks.rmsnorm import check_rms_norm_backward as rms_norm_backward
from .checks.rope import check_precompute_freqs_cis as precompute_freqs_cis                                   # 03
from .checks.rope import check_apply_rotary_emb as apply_rotary_emb, check_permute_hf_to_meta as permute_hf_to_meta
from .checks.rope import check_rope_shift as rope_shift
from .checks.attention import check_causal_mask as causal_mask, check_repeat_kv as repeat_kv                  # 04
from .checks.attention import check_scaled_dot_product as scaled_dot_product, check_KVCache as KVCache
from .checks.attention import check_scaled_dot_product_gqa as scaled_dot_product_gqa
from .checks.attention import check_merge_attention as merge_attention
from .checks.feed_forward import check_llama_hidden_dim as llama_hidden_dim, check_FeedForward as FeedForward  # 05
from .checks.feed_forward import check_swiglu_backward as swiglu_backward
from .checks.model import check_TransformerBlock as TransformerBlock, check_count_parameters as count_parameters  # 06
from .checks.model import check_Transformer as Transformer, check_decode_flops as decode_flops
from .checks.weights import check_gguf_to_meta_name as gguf_to_meta_name, check_merge_meta_shards as merge_meta_shards  # 07
from .checks.weights import check_dequantize_q8_0 as dequantize_q8_0, check_dequantize_q4_0 as dequantize_q4_0
from .checks.weights import check_dequantize_q4_1 as dequantize_q4_1, check_dequantize_iq4_nl as dequantize_iq4_nl
from .checks.gguf_tokenizer import check_bytes_to_unicode as bytes_to_unicode, check_bpe_word as bpe_word      # 07b
from .checks.gguf_tokenizer import check_first_misordered_merge as first_misordered_merge
from .checks.generation import check_top_p_filter as top_p_filter                                             # 07c
from .checks.generation import check_apply_repetition_penalty as apply_repetition_penalty
from .checks.generation import check_apply_temperature as apply_temperature, check_top_k_filter as top_k_filter
from .checks.generation import check_min_p_filter as min_p_filter
from .checks.generation import check_top_n_sigma_filter as top_n_sigma_filter
from .checks.cli import check_fit_conversation as fit_conversation                                            # 07d
from .checks.cli import check_prefill_per_turn as prefill_per_turn
from .checks.quantization import check_quantize_q8_0 as quantize_q8_0, check_quantize_q4_1 as quantize_q4_1  # 08
from .checks.quantization import check_quantize_q4_0 as quantize_q4_0, check_perplexity as perplexity
from .checks.quantization import check_quantize_q8_1 as quantize_q8_1
from .checks.fast_cpu import check_int4_scales_and_zeros as int4_scales_and_zeros                            # 08b
from .checks.fast_cpu import check_repack_rows8 as repack_rows8, check_q4_0_to_q4_1 as q4_0_to_q4_1
from .checks.cuda import check_qmatvec_q4_1 as qmatvec_q4_1, check_qmatvec_swiglu as qmatvec_swiglu     # 09
from .checks.gpu_decoder import check_add_rms_norm as add_rms_norm, check_softmax_temperature as softmax_temperature  # 09b
from .checks.serving import check_padding_causal_mask as padding_causal_mask                           # 11
from .checks.serving import check_slot_indices as slot_indices, check_shared_prefix_pages as shared_prefix_pages
from .checks.speculative import check_verify_greedy as verify_greedy, check_verify_sampled as verify_sampled  # 11b
from .checks.speculative import check_residual_distribution as residual_distribution
from .checks.speculative import check_acceptance_probability as acceptance_probability
from .checks.server import check_sse_event as sse_event, check_sampling_from_request as sampling_from_request  # 11c
from .checks.server import check_parse_sse as parse_sse
from .checks.tensor_parallel import check_row_parallel_linear as row_parallel_linear                      # 12
from .checks.tensor_parallel import check_gqa_head_split as gqa_head_split, check_ring_all_reduce as ring_all_reduce
from .checks.moe import check_top_k_routing as top_k_routing, check_load_balancing_loss as load_balancing_loss  # 12b
from .checks.moe import check_keep_within_capacity as keep_within_capacity
from .checks.training import check_log_softmax as log_softmax, check_cross_entropy as cross_entropy   # 13
from .checks.training import check_adamw_step as adamw_step, check_cosine_schedule as cosine_schedule
from .checks.training import check_cross_entropy_grad as cross_entropy_grad
from .checks.prune_distill import check_magnitude_mask as magnitude_mask, check_kd_loss as kd_loss        # 13b
from .checks.prune_distill import check_kv_group_importance as kv_group_importance, check_nm_mask as nm_mask
