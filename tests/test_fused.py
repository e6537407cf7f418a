"""Chapter 07c's fused layers: a module swap that changes the speed, not the model (logits, state-dict
names, checkpoints, ties, gradients), and swaps back."""
import copy
import io

import pytest
import torch
from torch import nn

from course_lib.attention import Attention, causal_mask
from course_lib.feed_forward import FeedForward
from course_lib.fused import FusedAttention, FusedFeedForward, fuse_model, is_fused
from course_lib.model import ModelArgs, Transformer
from course_lib.rope import precompute_freqs_cis


def small_model(tie=True, seed=1):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96,
                                 max_seq_len=32, tie_embeddings=tie)).eval()


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fuse_model_keeps_logits_names_values_and_tie(tie):
    model = small_model(tie)
    x = torch.randint(0, 300, (2, 9))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(x)
        assert fuse_model(model) is model and is_fused(model)
        attn, ff = model.layers[0].attention, model.layers[1].feed_forward
        assert isinstance(attn, FusedAttention) and isinstance(ff, FusedFeedForward)
        assert not hasattr(attn, "wq") and attn.wqkv.weight.shape == (64 + 32 + 32, 64)
        assert attn.wqkv.weight.t().is_contiguous() and attn.wo.weight.is_contiguous()   # (in, out); wo as it was
        assert ff.w13.weight.shape == (2 * 96, 64) and ff.w13.weight.t().is_contiguous() and ff.w2.weight.is_contiguous()
        assert model.output.weight.stride() == (1, 300)
        assert (model.output.weight is model.tok_embeddings.weight) == tie
        now = model.state_dict()
        assert sorted(now) == sorted(state)                                   # Meta's names
        assert all(torch.equal(now[k], state[k]) for k in state)              # and values
        assert relative(model(x), plain) < 1e-6
        assert fuse_model(model) is model                                     # twice: nothing more to do
        fuse_model(model, fuse=False)
        assert not is_fused(model) and type(model.layers[0].attention) is Attention
        assert all(p.is_contiguous() for p in model.parameters())
        assert (model.output.weight is model.tok_embeddings.weight) == tie
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert relative(model(x), plain) < 1e-6


def test_checkpoints_load_into_a_fused_model_and_round_trip():
    source, target = small_model(seed=2), fuse_model(small_model(seed=3))
    x = torch.randint(0, 300, (1, 7))
    target.load_state_dict(source.state_dict())                               # Meta's names into fused layers
    with torch.no_grad():
        assert relative(target(x), source(x)) < 1e-6
    assert torch.equal(target.layers[1].attention.wqkv.weight[64:96], source.layers[1].attention.wk.weight)
    bad = source.state_dict()
    bad["layers.0.attention.wk.weight"] = torch.zeros(16, 64)                # wrong shape: refused, named
    with pytest.raises(RuntimeError, match="wqkv"):
        target.load_state_dict(bad)
    del bad["layers.0.attention.wk.weight"]                                   # a part missing: refused
    with pytest.raises(RuntimeError, match="Missing key"):
        target.load_state_dict(bad)


def test_copy_pickle_and_training_work_on_fused_layers():
    model = fuse_model(small_model())
    x = torch.randint(0, 300, (1, 6))
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)                                                 # the hooks are picklable
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        expected = model(x)
        for other in (twin, loaded):
            assert relative(other(x), expected) == 0
            assert sorted(other.state_dict()) == sorted(model.state_dict())
    model.train()
    model(x).sum().backward()                                                 # gradients reach the fused weights
    assert model.layers[0].attention.wqkv.weight.grad is not None
    assert model.layers[0].feed_forward.w13.weight.grad is not None


def test_fused_layers_called_directly_check_like_the_plain_ones():
    attention, ff = Attention(64, 8, 2, max_seq_len=16), FeedForward(64, 96)
    fused_attention, fused_ff = FusedAttention(copy.deepcopy(attention)), FusedFeedForward(copy.deepcopy(ff))
    freqs = precompute_freqs_cis(8, 16)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert relative(fused_attention(x, 0, freqs[:5], causal_mask(5)), attention(x, 0, freqs[:5], causal_mask(5))) < 1e-6
        assert relative(fused_ff(x), ff(x)) < 1e-6
    for layer in (attention, fused_attention):
        with pytest.raises(ValueError, match=r"x must be \(batch, seq, dim=64\), got \(1, 3, 32\)"):
            layer(torch.zeros(1, 3, 32), 0, freqs[:3])
    for layer in (ff, fused_ff):
        with pytest.raises(ValueError, match="its last dimension must equal dim=64"):
            layer(torch.zeros(2, 32))


def test_fuse_model_refuses_what_it_cannot_fuse():
    with pytest.raises(TypeError, match="model must be a course_lib Transformer, got Linear"):
        fuse_model(nn.Linear(2, 2))
    model = small_model()

    class Odd(nn.Module):          # stands in for a quantized layer: not a float nn.Linear
        def forward(self, x):
            return x
    model.layers[1].attention.wk = Odd()
    with pytest.raises(TypeError, match=r"layers.1.attention.wk is a Odd"):
        fuse_model(model)
    assert not is_fused(model)                                                # refused before any swap


def test_fuse_model_inside_inference_mode_still_gives_loadable_weights():
    model = small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        fuse_model(model)
    model.load_state_dict(state)                                              # in-place copies: normal tensors
    assert not model.layers[0].attention.wqkv.weight.is_inference()


def test_quantize_model_takes_a_fused_model():
    from course_lib.quant_model import quantize_model
    plain, fused = small_model(seed=5), fuse_model(small_model(seed=5))
    x = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        a = quantize_model(plain, "q8_0", matmul="dequant")(x)
        b = quantize_model(fused, "q8_0", matmul="dequant")(x)
    assert torch.equal(a, b) and not is_fused(fused)
