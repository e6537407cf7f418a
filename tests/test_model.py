"""Chapter 06: the decoder block and the full model.

References: transformers' LlamaDecoderLayer (the block), published parameter counts and the modules'
own numel on the meta device (count_parameters), and the input checks' messages.
"""
from dataclasses import replace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from course_lib import (PRESETS, ModelArgs, Transformer, TransformerBlock, args_from_hf_config,
                        count_parameters, permute_meta_to_hf, precompute_freqs_cis)
from course_lib.attention import causal_mask
from course_lib.checks.model import check_count_parameters, check_decode_flops, check_Transformer, check_TransformerBlock
from course_lib.model import parameter_breakdown
import course_lib.model as M
from course_lib.decoding import validate_decode_input
from shortcuts import refused, source_copy

SMALL = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=40, max_seq_len=16)


# ---------------------------------------------------------------- the block against LlamaDecoderLayer

def _block_pair(n_heads, n_kv_heads, dim=48, hidden=80, theta=10000.0, seed=0):
    "Our TransformerBlock and an HF LlamaDecoderLayer holding the same weights."
    torch.manual_seed(seed)
    args = ModelArgs(dim=dim, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=10,
                     hidden_dim=hidden, rope_theta=theta, max_seq_len=32)
    ours = TransformerBlock(0, args).eval()
    with torch.no_grad():
        ours.attention_norm.weight.copy_(1 + 0.3 * torch.randn(dim))
        ours.ffn_norm.weight.copy_(1 + 0.3 * torch.randn(dim))
    cfg = LlamaConfig(hidden_size=dim, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      intermediate_size=hidden, rms_norm_eps=args.norm_eps, rope_theta=theta,
                      max_position_embeddings=32, num_hidden_layers=1, vocab_size=10, attn_implementation="eager")
    hf = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    a, f = ours.attention, ours.feed_forward
    hf.load_state_dict({
        "self_attn.q_proj.weight": permute_meta_to_hf(a.wq.weight.detach(), n_heads),
        "self_attn.k_proj.weight": permute_meta_to_hf(a.wk.weight.detach(), n_kv_heads),
        "self_attn.v_proj.weight": a.wv.weight.detach(), "self_attn.o_proj.weight": a.wo.weight.detach(),
        "mlp.gate_proj.weight": f.w1.weight.detach(), "mlp.down_proj.weight": f.w2.weight.detach(),
        "mlp.up_proj.weight": f.w3.weight.detach(),
        "input_layernorm.weight": ours.attention_norm.weight.detach(),
        "post_attention_layernorm.weight": ours.ffn_norm.weight.detach(),
    })
    return args, ours, hf, cfg


def _hf_block(hf, cfg, x):
    "Run the HF layer over a whole sequence with a causal mask built here, independently of course_lib."
    seq = x.shape[1]
    position_ids = torch.arange(seq)[None]
    cos_sin = LlamaRotaryEmbedding(cfg)(x, position_ids)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]  # (1, 1, seq, seq)
    return hf(x, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2), (6, 1)])
def test_block_prefill_matches_hf(n_heads, n_kv_heads):
    args, ours, hf, cfg = _block_pair(n_heads, n_kv_heads)
    x = torch.randn(3, 9, args.dim)
    freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta)[:9]
    with torch.no_grad():
        expected = _hf_block(hf, cfg, x)
        actual = ours(x, 0, freqs_cis, causal_mask(9))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_block_decode_matches_hf():
    args, ours, hf, cfg = _block_pair(6, 2, theta=100000.0, seed=1)
    x = torch.randn(2, 10, args.dim)
    freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta)
    with torch.no_grad():
        expected = _hf_block(hf, cfg, x)                       # (2, 10, dim) in one pass
        pieces = [ours(x[:, :6], 0, freqs_cis[:6], causal_mask(6))]
        for pos in range(6, 10):
            pieces.append(ours(x[:, pos:pos + 1], pos, freqs_cis[pos:pos + 1], None))
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- ModelArgs and presets

def test_model_args_defaults():
    args = ModelArgs(**SMALL)
    assert (args.head_dim, args.n_kv_heads, args.norm_eps, args.rope_theta) == (8, 2, 1e-5, 10000.0)
    assert args.hidden_dim is None and args.tie_embeddings is False
    # Llama 2's rule by hand: int(2 * 4 * 32 / 3) = 85, rounded up to a multiple of 256
    assert args.ffn_hidden_dim == 256
    assert ModelArgs(dim=32, n_heads=4).n_kv_heads == 4      # None means MHA
    model = Transformer(args)
    assert model.layers[0].feed_forward.w1.weight.shape == (256, 32)
    assert model.layers[0].attention.wk.weight.shape == (16, 32)


def test_hidden_dim_override():
    args = ModelArgs(**SMALL, hidden_dim=88)
    assert args.ffn_hidden_dim == 88
    ff = Transformer(args).layers[0].feed_forward
    assert ff.w1.weight.shape == (88, 32) and ff.w2.weight.shape == (32, 88) and ff.w3.weight.shape == (88, 32)


def test_tie_embeddings():
    untied, tied = ModelArgs(**SMALL), ModelArgs(**SMALL, tie_embeddings=True)
    model = Transformer(tied)
    assert model.output.weight is model.tok_embeddings.weight
    n_untied = sum(p.numel() for p in Transformer(untied).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_untied - 40 * 32
    assert count_parameters(untied) - count_parameters(tied) == 40 * 32
    # the shared matrix receives gradient from both uses
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.tok_embeddings.weight.grad is model.output.weight.grad


def test_presets_shapes():
    assert {k: PRESETS[k].ffn_hidden_dim for k in PRESETS} == {
        "llama-2-7b": 11008, "llama-2-13b": 13824, "llama-2-70b": 28672, "smollm2-135m": 1536, "tiny": 176}
    s = PRESETS["smollm2-135m"]
    assert (s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size, s.rope_theta, s.tie_embeddings) \
        == (576, 30, 9, 3, 64, 49152, 100000.0, True)


# published sizes: Llama 2 paper / Meta's checkpoints, and SmolLM2-135M's model card (134.5 M)
@pytest.mark.parametrize("name,expected", [("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320),
                                           ("llama-2-70b", 68_976_648_192), ("smollm2-135m", 134_515_008)])
def test_preset_parameter_counts(name, expected):
    assert count_parameters(PRESETS[name]) == expected


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_parameters_matches_meta_model(name):
    with torch.device("meta"):
        model = Transformer(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == count_parameters(PRESETS[name])


def test_parameter_breakdown():
    b = parameter_breakdown(PRESETS["llama-2-7b"])
    assert b == {"tok_embeddings": 32000 * 4096, "attention": 32 * 4 * 4096 ** 2,
                 "feed_forward": 32 * 3 * 4096 * 11008, "norms": 65 * 4096, "output": 32000 * 4096}
    b70 = parameter_breakdown(PRESETS["llama-2-70b"])
    assert b70["attention"] == 80 * (2 * 8192 ** 2 + 2 * 8192 * 1024)   # GQA: 8 K/V heads of 128
    assert parameter_breakdown(PRESETS["smollm2-135m"])["output"] == 0
    with pytest.raises(TypeError, match="args must be a ModelArgs, got dict"):
        parameter_breakdown(dict(dim=4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=64, n_heads=5), r"n_heads=5 must divide dim=64"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), r"n_heads=4 must be a multiple of n_kv_heads=3"),
    (dict(dim=64, n_heads=4, n_kv_heads=8), r"n_heads=4 must be a multiple of n_kv_heads=8"),
    (dict(dim=12, n_heads=4), r"head_dim = dim / n_heads = 12 / 4 = 3 must be even"),
    (dict(dim=0), r"ModelArgs.dim must be a positive int, got 0"),
    (dict(n_layers=2.0), r"ModelArgs.n_layers must be a positive int, got 2.0"),
    (dict(vocab_size=True), r"ModelArgs.vocab_size must be a positive int, got True"),
    (dict(hidden_dim=-5), r"ModelArgs.hidden_dim must be a positive int or None, got -5"),
    (dict(ffn_dim_multiplier=0.0), r"ffn_dim_multiplier must be positive or None, got 0.0"),
    (dict(norm_eps=0.0), r"norm_eps must be a positive finite number, got 0.0"),
    (dict(rope_theta=-1.0), r"rope_theta must be a positive finite number, got -1.0"),
    (dict(norm_eps=float("inf")), r"norm_eps must be a positive finite number, got inf"),
    (dict(rope_theta=float("nan")), r"rope_theta must be a positive finite number, got nan"),
    (dict(ffn_dim_multiplier="1.3"), r"ffn_dim_multiplier must be positive or None, got '1.3'"),
])
def test_model_args_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**kwargs)


def test_transformer_needs_model_args():
    with pytest.raises(TypeError, match="args must be a ModelArgs, got dict"):
        Transformer(dict(dim=32))


# ---------------------------------------------------------------- forward: batches, cache, bad input

@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return Transformer(ModelArgs(**SMALL)).eval()


def test_batch_forward_equals_rows(small_model):
    tokens = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = small_model(tokens)
        rows = torch.cat([small_model(tokens[i:i + 1]) for i in range(3)])
    assert batch.shape == (3, 7, 40) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, rows, atol=1e-5, rtol=1e-5)


def test_batch_decode_equals_full(small_model):
    tokens = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = small_model(tokens)
        steps = [small_model(tokens[:, :5])] + [small_model(tokens[:, p:p + 1], start_pos=p) for p in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert (small_model.cache_len, small_model.cache_batch_size) == (12, 4)


def test_int32_tokens_and_restart(small_model):
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = small_model(tokens)
        small_model(tokens[:, :1], start_pos=6)                # extend, then start a new sequence at 0
        b = small_model(tokens.to(torch.int32))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tokens,start_pos,error,match", [
    (torch.zeros(1, 3), 0, TypeError, r"tokens must be an integer tensor .* got torch.float32"),
    (torch.zeros(1, 3, dtype=torch.bool), 0, TypeError, r"tokens must be an integer tensor .* got torch.bool"),
    ([[1, 2, 3]], 0, TypeError, r"tokens must be an integer tensor .* got list"),
    (torch.tensor([1, 2, 3]), 0, ValueError, r"tokens must be a non-empty 2-D tensor .* got shape \(3,\); .*tokens\[None\]"),
    (torch.zeros(1, 2, 3, dtype=torch.long), 0, ValueError, r"tokens must be .* 2-D .* got shape \(1, 2, 3\)"),
    (torch.zeros(1, 0, dtype=torch.long), 0, ValueError, r"non-empty .* got shape \(1, 0\)"),
    (torch.tensor([[1, 40, 2]]), 0, ValueError, r"tokens contains id 40, outside the vocabulary \[0, vocab_size=40\)"),
    (torch.tensor([[1, -1, 2]]), 0, ValueError, r"tokens contains id -1, outside the vocabulary"),
    (torch.tensor([[1, 2]]), -1, ValueError, r"start_pos must be >= 0, got start_pos=-1"),
    (torch.tensor([[1, 2]]), 1.0, TypeError, r"start_pos must be an int, got float"),
    (torch.zeros(1, 17, dtype=torch.long), 0, ValueError, r"start_pos \+ seq = 0 \+ 17 = 17 exceeds max_seq_len=16"),
])
def test_forward_bad_input(small_model, tokens, start_pos, error, match):
    with pytest.raises(error, match=match):
        small_model(tokens, start_pos)


def test_forward_past_max_seq_len_after_prefill(small_model):
    small_model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"start_pos \+ seq = 4 \+ 13 = 17 exceeds max_seq_len=16"):
        small_model(torch.zeros(1, 13, dtype=torch.long), start_pos=4)


def test_forward_gap_in_cache(small_model):
    with pytest.raises(ValueError, match=r"start_pos=3 leaves a gap: .*cache_len=0"):
        small_model(torch.zeros(1, 1, dtype=torch.long), start_pos=3)   # nothing cached yet
    small_model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"start_pos=6 leaves a gap: the KV cache holds positions 0..3 \(cache_len=4\)"):
        small_model(torch.zeros(1, 1, dtype=torch.long), start_pos=6)
    small_model(torch.zeros(1, 1, dtype=torch.long), start_pos=4)       # no gap: fine


def test_forward_batch_change_mid_sequence(small_model):
    small_model(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens has batch size 3 but the cached sequences have batch size 2"):
        small_model(torch.zeros(3, 1, dtype=torch.long), start_pos=4)


def test_args_from_hf_config_rejects_other_activations():
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                      vocab_size=50, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        args_from_hf_config(cfg)


# ---------------------------------------------------------------- check_TransformerBlock

# copies of the reference (what a student who retyped it hands in): the checkers switch off the library's own
MyBlock = source_copy(M, "TransformerBlock")

class PostNorm(MyBlock):
    def forward(self, x, start_pos, freqs_cis, mask=None):
        h = self.attention_norm(x + self.attention(x, start_pos, freqs_cis, mask))
        return self.ffn_norm(h + self.feed_forward(h))


class NoAttentionResidual(MyBlock):
    def forward(self, x, start_pos, freqs_cis, mask=None):
        h = self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class OneNormForBoth(MyBlock):
    def forward(self, x, start_pos, freqs_cis, mask=None):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.attention_norm(h))


class IgnoresMask(MyBlock):
    def forward(self, x, start_pos, freqs_cis, mask=None):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, None)
        return h + self.feed_forward(self.ffn_norm(h))


class OtherNames(nn.Module):
    def __init__(self, layer_id, args):
        super().__init__()
        self.block = MyBlock(layer_id, args)

    def forward(self, x, start_pos, freqs_cis, mask=None):
        return self.block(x, start_pos, freqs_cis, mask)


def test_check_block_passes_a_copy_of_the_course_block():
    result = check_TransformerBlock(MyBlock)
    assert result and "passed all 3 cases" in str(result)


@pytest.mark.parametrize("candidate,n_failed,says", [
    (PostNorm, 3, "post-norm"),
    (NoAttentionResidual, 3, "no residual around attention"),
    (OneNormForBoth, 3, "uses attention_norm before the feed-forward"),
    (IgnoresMask, 2, "does not pass `mask` to attention"),
    (OtherNames, 3, "missing ['attention.wk.weight'"),
])
def test_check_block_catches_mistakes(candidate, n_failed, says):
    result = check_TransformerBlock(candidate)
    assert not result
    assert f"failed {n_failed} of 3" in str(result) and says in str(result)


def test_check_block_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    check_TransformerBlock(MyBlock)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- check_count_parameters

def _kv(args):
    return args.n_kv_heads * args.head_dim


my_count_parameters = source_copy(M, "parameter_breakdown", "count_parameters")[-1]


def test_check_count_passes_a_copy_of_the_course_function():
    assert check_count_parameters(my_count_parameters)


@pytest.mark.parametrize("wrong,says", [
    (lambda a: my_count_parameters(replace(a, tie_embeddings=False)),
     ["preset 'smollm2-135m'", "expected 134,515,008, got 162,826,560 (difference +28,311,552)", "tied"]),
    (lambda a: my_count_parameters(a) + 2 * a.n_layers * a.dim * (a.dim - _kv(a)),  # wk, wv as dim × dim
     ["preset 'llama-2-70b'", "expected 68,976,648,192", "GQA is ignored"]),
    (lambda a: my_count_parameters(a) - 2 * a.n_layers * a.dim - a.dim,
     ["preset 'llama-2-7b'", "difference -266,240", "RMSNorm weights are missing"]),
    (lambda a: my_count_parameters(a) + 3 * a.n_layers * a.dim * (4 * a.dim - a.ffn_hidden_dim),  # hidden = 4·dim
     ["preset 'llama-2-13b'", "feed-forward size is wrong: your count implies 20480 per layer, this config has 13824"]),
    (lambda a: float(my_count_parameters(a)), ["returned float", "exact Python int"]),
])
def test_check_count_catches_mistakes(wrong, says):
    result = check_count_parameters(wrong)
    assert not result
    for s in says:
        assert s in str(result), s


def test_check_count_refuses_building_a_model_and_the_course_helpers():
    "The exercise says 'without building a model': a model on the meta device is refused, like any module."
    def on_meta(args):
        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(args).parameters())

    def own_modules_on_meta(args):                     # no course class at all: torch's own modules
        with torch.device("meta"):
            layer = nn.Linear(args.dim, args.dim, bias=False)
        return my_count_parameters(args) + 0 * layer.weight.numel()

    def breakdown(args):
        return sum(parameter_breakdown(args).values())
    assert refused(check_count_parameters(on_meta), "Module.__init__")
    assert refused(check_count_parameters(own_modules_on_meta), "Module.__init__")
    assert refused(check_count_parameters(breakdown), "parameter_breakdown")
    assert refused(check_count_parameters(count_parameters), "count_parameters")
    assert refused(check_count_parameters(lambda a: M.model_bytes(a) // 4), "count_parameters")


def test_check_block_refuses_the_course_block():
    assert refused(check_TransformerBlock(TransformerBlock), "TransformerBlock")

    class Subclass(TransformerBlock):
        pass

    class Wrapper(nn.Module):                          # right names, but the course block does the work
        def __init__(self, layer_id, args):
            super().__init__()
            inner = TransformerBlock(layer_id, args)
            self.attention, self.feed_forward = inner.attention, inner.feed_forward
            self.attention_norm, self.ffn_norm = inner.attention_norm, inner.ffn_norm

        def forward(self, x, start_pos, freqs_cis, mask=None):
            return TransformerBlock.forward(self, x, start_pos, freqs_cis, mask)
    assert refused(check_TransformerBlock(Subclass), "TransformerBlock")
    assert refused(check_TransformerBlock(Wrapper), "TransformerBlock")


# ---------------------------------------------------------------- check_Transformer

MyModel = source_copy(M, "Transformer")


def test_check_transformer_passes_a_copy_of_the_course_model():
    result = check_Transformer(MyModel)
    assert result and "passed all 5 cases" in str(result)


def test_check_transformer_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    check_Transformer(MyModel)
    assert torch.equal(torch.rand(3), expected)


class NoCacheLen(MyModel):                             # forgets to record what the caches hold
    def forward(self, tokens, start_pos=0, last_only=False):
        cache_len = self.cache_len
        out = super().forward(tokens, start_pos, last_only)
        self.cache_len = cache_len if start_pos else 0
        return out


class RotationsFromZero(MyModel):                      # every call rotates as if it started at position 0
    def forward(self, tokens, start_pos=0, last_only=False):
        table = self.freqs_cis
        self.freqs_cis = torch.cat([table[start_pos:], table[:start_pos]])
        try:
            return super().forward(tokens, start_pos, last_only)
        finally:
            self.freqs_cis = table


class MaskFromZero(MyModel):                           # causal_mask(seq) after cached positions: wrong width
    def forward(self, tokens, start_pos=0, last_only=False):
        validate_decode_input(self, tokens, start_pos)
        seq = tokens.shape[1]
        h = self.tok_embeddings(tokens.long())
        mask = causal_mask(seq) if seq > 1 else None
        for layer in self.layers:
            h = layer(h, start_pos, self.freqs_cis[start_pos:start_pos + seq], mask)
        self.cache_len, self.cache_batch_size = start_pos + seq, tokens.shape[0]
        return self.output(self.norm(h[:, -1:] if last_only else h)).float()


class IgnoresLastOnly(MyModel):
    def forward(self, tokens, start_pos=0, last_only=False):
        return super().forward(tokens, start_pos, False)


class ModelDtypeLogits(MyModel):                       # returns bfloat16 logits for a bfloat16 model
    def forward(self, tokens, start_pos=0, last_only=False):
        return super().forward(tokens, start_pos, last_only).to(self.output.weight.dtype)


@pytest.mark.parametrize("candidate,says", [
    (NoCacheLen, ["decode steps", "leaves a gap"]),
    (RotationsFromZero, ["decode steps", "logits of positions 6..6"]),
    (MaskFromZero, ["chunked prefill", "raised"]),
    (IgnoresLastOnly, ["last_only=True", "shape (2, 7, 40), expected (2, 1, 40)"]),
    (ModelDtypeLogits, ["bfloat16", "dtype torch.bfloat16, expected torch.float32"]),
])
def test_check_transformer_catches_mistakes(candidate, says):
    result = check_Transformer(candidate)
    assert not result, str(result)
    for s in says:
        assert s in str(result), (s, str(result))


def test_check_transformer_refuses_the_course_model():
    assert refused(check_Transformer(Transformer), "Transformer")

    class Subclass(Transformer):
        pass

    class Borrows(MyModel):                            # the course's forward on the candidate's modules
        def forward(self, tokens, start_pos=0, last_only=False):
            return Transformer.forward(self, tokens, start_pos, last_only)
    assert refused(check_Transformer(Subclass), "Transformer")
    assert refused(check_Transformer(Borrows), "Transformer")


# ---------------------------------------------------------------- check_decode_flops (exercise 3)

def decode_flops(args, pos):
    "06's Exercise 3, answered (the notebook's appendix has the same)."
    d, L, kv_dim = args.dim, args.n_layers, args.n_kv_heads * args.head_dim
    matmul_weights = L * (2 * d * d + 2 * d * kv_dim + 3 * d * args.ffn_hidden_dim) + args.vocab_size * d
    return 2 * matmul_weights + 4 * L * d * (pos + 1)


def test_check_decode_flops_accepts_an_answer():
    assert check_decode_flops(decode_flops)


def _attention(a, pos):
    return 4 * a.n_layers * a.dim * (pos + 1)


@pytest.mark.parametrize("wrong,says", [
    (lambda a, p: decode_flops(a, p) - (2 * a.vocab_size * a.dim if a.tie_embeddings else 0),
     ["smollm2-135m", "output layer's product is missing"]),
    (lambda a, p: decode_flops(a, p) + 2 * a.vocab_size * a.dim, ["embedding lookup is counted"]),
    (lambda a, p: decode_flops(a, p) - _attention(a, p), ["attention over the cache is missing"]),
    (lambda a, p: decode_flops(a, p) - 4 * a.n_layers * a.dim, ["it sees itself too: pos + 1"]),
    (lambda a, p: decode_flops(a, p) - _attention(a, p) + _attention(a, p) * a.n_kv_heads // a.n_heads,
     ["llama-2-70b", "counted for the K/V heads only"]),
    (lambda a, p: decode_flops(a, p) // 2, ["one FLOP per multiply-add"]),
    (lambda a, p: float(decode_flops(a, p)), ["exact Python int"]),
])
def test_check_decode_flops_names_the_usual_mistakes(wrong, says):
    result = check_decode_flops(wrong)
    assert not result
    for s in says:
        assert s in str(result), (s, str(result))


def test_check_decode_flops_refuses_measuring_a_model():
    from torch.utils.flop_counter import FlopCounterMode

    def measured(args, pos):
        with FlopCounterMode(display=False) as counter:
            Transformer(args)(torch.zeros(1, 1, dtype=torch.long))
        return counter.get_total_flops()
    assert refused(check_decode_flops(measured), "FlopCounterMode")
    assert refused(check_decode_flops(lambda a, p: sum(x.numel() for x in Transformer(a).parameters())),
                   "Module.__init__")


# ---------------------------------------------------------------- inputs checked once, at the entry

def test_layers_inside_forward_skip_their_checks_and_check_when_called_directly(monkeypatch):
    "Transformer.forward checks the tokens once; its layers trust their inputs there, and check them on their own."
    from course_lib.attention import Attention, KVCache
    from course_lib.feed_forward import FeedForward
    from course_lib.validation import inputs_trusted, trusted_inputs
    model = Transformer(PRESETS["tiny"]).eval()
    tokens = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 5))
    calls = []

    def refuse(name):
        def check(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} checked inside the trusted forward pass")
        return check
    monkeypatch.setattr(Attention, "_check_input", refuse("Attention"))
    monkeypatch.setattr(FeedForward, "_check_input", refuse("FeedForward"))
    monkeypatch.setattr(KVCache, "_check_update", refuse("KVCache"))
    with torch.no_grad():
        model(tokens)                                           # prefill
        model(tokens[:, :1], start_pos=5)                       # and a decode step
    assert calls == [] and not inputs_trusted()                 # and the flag is down again afterwards
    monkeypatch.undo()
    layer = model.layers[0]
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, dim=64\)"):
        layer.attention(torch.zeros(1, 3, 32), 0, model.freqs_cis[:3])
    with pytest.raises(ValueError, match="its last dimension must equal dim"):
        layer.feed_forward(torch.zeros(2, 3, 7))
    with trusted_inputs():                                      # the flag nests and resets
        with trusted_inputs():
            assert inputs_trusted()
        assert inputs_trusted()
    assert not inputs_trusted()


def test_an_error_inside_forward_leaves_the_checks_on():
    from course_lib.validation import inputs_trusted
    model = Transformer(PRESETS["tiny"]).eval()
    model.layers[1].feed_forward.w2 = None                       # breaks the forward pass half way
    with pytest.raises(TypeError):
        model(torch.zeros(1, 3, dtype=torch.long))
    assert not inputs_trusted()
