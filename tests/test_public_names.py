"""The public API does not shrink: every name `course_lib` and `course_lib.check` offered when the
modules were reorganised (issue 15) is still there, whichever module it now lives in."""
import inspect

import pytest

import course_lib
import course_lib.check as check

COURSE_LIB = """
Attention BPE Backend CCompilerError CDecodeStep CudaQuantModel FastQuantModel FeedForward FetchError
GGUFTokenizer GenerationStats Int4Matmul KVCache METHODS ModelArgs PRESETS QuantEmbedding QuantLinear
QuantMatrix RMSNorm SCHEMES Tokenizer Transformer TransformerBlock apply_repetition_penalty apply_rotary_emb
apply_rotary_emb_hf args_from_hf_config backend_status bpe_word bytes_to_unicode causal_mask compare_models
compile_ptx count_parameters decode_bytes_per_token decode_source decoder_device dequantize export_gguf
fetch_smollm2 from_hf generate generate_stream generate_tokens get_backend get_pair_counts gpu_available
kv_cache_bytes llama_hidden_dim load_gguf load_gguf_model load_hf_checkpoint load_meta_checkpoint
load_quantized load_smollm2 logit_metrics merge_pair min_p_filter next_token_probs peak_bandwidth
permute_hf_to_meta permute_meta_to_hf perplexity plot_roofline precompute_cos_sin precompute_freqs_cis
pretokenize quantize quantize_model read_gguf render_chat_template repack_blocks repeat_kv rms_norm
rotate_half sample_next_token sampling_table save_quantized scaled_dot_product tokens_per_second_bound
top_k_filter top_p_filter train_sentencepiece unpack_blocks upload_matrix weight_bytes
Decoder validate_decode_input fuse_model is_fused FusedAttention FusedFeedForward fit_conversation
generate_batch padding_causal_mask PagedKVCache Engine create_app ServerThread
speculative_generate SpeculativeStats layer_skip_draft
top_k_routing MoEFeedForward load_balancing_loss active_parameters
tensor_parallel_logits tensor_parallel_generate shard_model ColumnParallelLinear RowParallelLinear
log_softmax cross_entropy adamw_step AdamW cosine_schedule clip_grad_norm TokenData text_data init_weights TrainLog
evaluate_loss save_checkpoint load_checkpoint train bits_per_character sample_text train_text_model
magnitude_mask magnitude_prune importance_scores kv_group_importance remove_kv_groups remove_ffn_channels
remove_layers prune_model kd_loss distillation_loss recovered_fraction
""".split()

CHECKERS = """
row_parallel_linear gqa_head_split ring_all_reduce
FeedForward KVCache RMSNorm TransformerBlock add_rms_norm apply_repetition_penalty apply_rotary_emb
apply_temperature bpe_encode bpe_word bytes_to_unicode causal_mask count_parameters dequantize_q4_0 dequantize_q4_1
dequantize_q8_0 gguf_to_meta_name llama_hidden_dim merge_meta_shards merge_pair permute_hf_to_meta
perplexity precompute_freqs_cis qmatvec_q4_1 qmatvec_swiglu quantize_q4_0 quantize_q4_1 quantize_q8_0
repeat_kv rms_norm rms_norm_backward scaled_dot_product top_k_filter top_p_filter fit_conversation
int4_scales_and_zeros repack_rows8 decode_complete rope_shift
scaled_dot_product_gqa merge_attention swiglu_backward softmax_temperature
prefill_per_turn first_misordered_merge dequantize_iq4_nl Transformer decode_flops
min_p_filter top_n_sigma_filter q4_0_to_q4_1 quantize_q8_1
padding_causal_mask slot_indices shared_prefix_pages
sse_event sampling_from_request parse_sse
verify_greedy verify_sampled residual_distribution acceptance_probability
top_k_routing load_balancing_loss keep_within_capacity
log_softmax cross_entropy adamw_step cosine_schedule cross_entropy_grad
magnitude_mask kv_group_importance kd_loss nm_mask
""".split()


@pytest.mark.parametrize("name", COURSE_LIB)
def test_course_lib_keeps(name):
    assert hasattr(course_lib, name), f"course_lib.{name} disappeared"


@pytest.mark.parametrize("name", CHECKERS)
def test_check_keeps(name):
    fn = getattr(check, name, None)
    assert callable(fn), f"course_lib.check.{name} disappeared"
    assert inspect.signature(fn).parameters, f"check.{name} takes no candidate"


def test_lists_are_complete():
    "A new public name is added to the lists above, so that it cannot vanish later unnoticed."
    public = {n for n in dir(course_lib) if not n.startswith("_") and not inspect.ismodule(getattr(course_lib, n))}
    checkers = {n for n in dir(check) if not n.startswith("_") and not inspect.ismodule(getattr(check, n))}
    assert public - {"__version__"} <= set(COURSE_LIB) | {"CheckResult"}, sorted(public - set(COURSE_LIB))
    assert checkers <= set(CHECKERS) | {"CheckResult"}, sorted(checkers - set(CHECKERS))
