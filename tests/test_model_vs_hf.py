"""The whole forward pass against Hugging Face's LlamaForCausalLM, the independent reference."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM

import course_lib
from course_lib import ModelArgs, Transformer, from_hf

# (hidden, layers, heads, kv_heads, intermediate, vocab, rope_theta, tied): MHA, GQA, MQA and odd sizes
CONFIGS = {
    "mha": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=172, vocab_size=97, rope_theta=10000.0, tie_word_embeddings=False),
    "gqa-tied": dict(hidden_size=72, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=150, vocab_size=131, rope_theta=100000.0, tie_word_embeddings=True),
    "mqa-odd": dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
                    intermediate_size=77, vocab_size=53, rope_theta=500.0, tie_word_embeddings=False),
}


def make_hf(name, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=64, rms_norm_eps=1e-5,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    # random init leaves norms at 1; perturb them so a wrong norm weight mapping shows
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_full_forward_matches_hf(name):
    hf = make_hf(name)
    ours = from_hf(hf)
    tokens = torch.randint(0, hf.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = ours(tokens)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_matches_hf(name):
    hf = make_hf(name, seed=2)
    ours = from_hf(hf)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens).logits                     # (2, 13, vocab): one full pass
        prefill = 5
        pieces = [ours(tokens[:, :prefill], start_pos=0)]
        for pos in range(prefill, tokens.shape[1]):      # then one token at a time through the cache
            pieces.append(ours(tokens[:, pos:pos + 1], start_pos=pos))
        actual = torch.cat(pieces, dim=1)
    assert (actual - expected).abs().max().item() <= 1e-4


def test_config_mapping():
    hf = make_hf("gqa-tied")
    args = from_hf(hf).args
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (72, 3, 6, 2)
    assert (args.vocab_size, args.hidden_dim, args.rope_theta, args.tie_embeddings) == (131, 150, 100000.0, True)
    assert args.max_seq_len == 64 and args.norm_eps == 1e-5


def test_tied_embeddings_share_storage():
    ours = from_hf(make_hf("gqa-tied"))
    assert ours.output.weight.data_ptr() == ours.tok_embeddings.weight.data_ptr()


def test_meta_parameter_names():
    names = set(dict(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=40,
                                            max_seq_len=16)).named_parameters()))
    assert names == {"tok_embeddings.weight", "norm.weight", "output.weight",
                     "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
                     "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
                     "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
                     "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight",
                     "layers.0.ffn_norm.weight"}
