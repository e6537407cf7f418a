"""Chapter 13b, pruning: magnitude masks, importance scores, structured cuts against their reference computations,
cached decoding of a pruned model, bad input, and the chapter's pruning checkers (tiny random models: fast)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import course_lib.training.prune as module
from course_lib.checks.prune_distill import (_nm_reference, check_kv_group_importance, check_magnitude_mask,
                                             check_nm_mask)
from course_lib.evaluation import compare_models, perplexity
from course_lib.model import ModelArgs, Transformer
from course_lib.training.prune import (block_influence, block_linears, channel_importance, compare_to_reference,
                                       decode_timing, importance_scores, kv_group_importance, magnitude_mask,
                                       magnitude_prune, median_ms, parameter_count, prune_model, reference_logits,
                                       remove_ffn_channels, remove_kv_groups, remove_layers, sparsity_of)
from shortcuts import refused, source_copy


def _model(seed=0, n_layers=4):
    torch.manual_seed(seed)
    args = ModelArgs(dim=48, n_layers=n_layers, n_heads=6, n_kv_heads=3, vocab_size=97, hidden_dim=64, max_seq_len=64)
    return Transformer(args).eval()


def _tokens(shape, seed=1):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


# --- unstructured ------------------------------------------------------------------------------------------------

def test_magnitude_mask_by_hand_and_counts():
    w = torch.tensor([[0.5, -0.1, 2.0], [-3.0, 0.05, 0.2]])
    assert magnitude_mask(w, 0.5).tolist() == [[True, False, True], [True, False, False]]
    assert magnitude_mask(w, 0.0).all()
    x = torch.randn(37, 11)
    for s in (0.1, 0.25, 0.5, 0.9, 0.99):
        keep = magnitude_mask(x, s)
        assert int((~keep).sum()) == round(s * x.numel())
        assert x.abs()[~keep].max() <= x.abs()[keep].min()


def test_magnitude_mask_ties_prune_exactly_the_count():
    keep = magnitude_mask(torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0]), 0.4)
    assert int((~keep).sum()) == 2 and keep[4]


def test_magnitude_prune_per_matrix():
    m = _model()
    names = {n.split(".", 2)[2] for n, _ in block_linears(m)}
    assert names == {"attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}
    emb = m.tok_embeddings.weight.clone()
    magnitude_prune(m, 0.5)
    assert abs(sparsity_of(m) - 0.5) < 1e-3
    for _, linear in block_linears(m):                         # each matrix, not the model, loses half
        assert abs((linear.weight == 0).float().mean().item() - 0.5) < 1e-3
    assert torch.equal(m.tok_embeddings.weight, emb)            # the tied embedding/output is not pruned


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True, "0.5", None, float("nan")])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(torch.randn(3, 3), bad)
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(_model(), bad)


def test_bad_weights_and_models():
    with pytest.raises(TypeError, match="floating-point"):
        magnitude_mask(torch.arange(6), 0.5)
    with pytest.raises(TypeError, match="Transformer"):
        magnitude_prune(torch.nn.Linear(3, 3), 0.5)


# --- scores ------------------------------------------------------------------------------------------------------

def test_kv_group_importance_equals_a_loop_over_heads():
    attn_out, wo = torch.randn(10, 6 * 8), torch.randn(48, 6 * 8)
    got = kv_group_importance(attn_out, wo, 3)
    heads = attn_out.view(10, 6, 8)
    for g in range(3):                                          # group g: query heads 2g, 2g+1
        contribution = sum(heads[:, h] @ wo[:, h * 8:(h + 1) * 8].T for h in (2 * g, 2 * g + 1))
        assert torch.allclose(got[g], contribution.norm(dim=-1).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        kv_group_importance(attn_out, wo, 5)
    with pytest.raises(ValueError, match="same width"):
        kv_group_importance(attn_out, wo[:, :40], 2)


def test_channel_importance_and_block_influence():
    h, w2 = torch.randn(7, 5), torch.randn(4, 5)
    assert torch.allclose(channel_importance(h, w2), h.abs().mean(0) * w2.norm(dim=0))
    x = torch.randn(6, 8)
    assert abs(block_influence(x, 3 * x)) < 1e-6 and abs(block_influence(x, -x) - 2) < 1e-6


def test_importance_scores_shapes_and_no_hooks_left():
    m = _model()
    s = importance_scores(m, _tokens((2, 12)))
    assert [g.shape for g in s["kv_groups"]] == [(3,)] * 4 and [c.shape for c in s["channels"]] == [(64,)] * 4
    assert s["layers"].shape == (4,)
    assert all(not layer._forward_hooks for layer in m.layers)


# --- structured cuts: each equals its reference ------------------------------------------------------------------

def test_removing_a_kv_group_equals_silencing_its_heads():
    m, tokens = _model(), _tokens((2, 10))
    cut = remove_kv_groups(copy.deepcopy(m), 1, [0, 2])
    silenced = copy.deepcopy(m)
    with torch.no_grad():
        silenced.layers[1].attention.wo.weight[:, :16] = 0      # group 0: heads 0, 1 (head_dim 8)
        silenced.layers[1].attention.wo.weight[:, 32:] = 0      # group 2: heads 4, 5
        assert torch.allclose(cut(tokens), silenced(tokens), atol=1e-5)
    attn = cut.layers[1].attention
    assert (attn.n_heads, attn.n_kv_heads, attn.wq.weight.shape, attn.wk.weight.shape, attn.wo.weight.shape) == \
        (2, 1, (16, 48), (8, 48), (48, 16))


def test_removing_channels_equals_zeroing_w2_columns():
    m, tokens = _model(), _tokens((1, 9))
    channels = [0, 5, 63]
    cut = remove_ffn_channels(copy.deepcopy(m), 2, channels)
    silenced = copy.deepcopy(m)
    with torch.no_grad():
        silenced.layers[2].feed_forward.w2.weight[:, channels] = 0
        assert torch.allclose(cut(tokens), silenced(tokens), atol=1e-5)
    assert cut.layers[2].feed_forward.hidden_dim == 61 and cut.layers[2].feed_forward.w2.weight.shape == (48, 61)


def test_removing_layers_equals_running_the_rest_by_hand():
    m, tokens = _model(), _tokens((1, 11))
    cut = remove_layers(copy.deepcopy(m), [0, 2])
    with torch.no_grad():
        h = m.tok_embeddings(tokens)
        mask = torch.full((11, 11), float("-inf")).triu(1)
        for i in (1, 3):
            h = m.layers[i](h, 0, m.freqs_cis[:11], mask)
        assert torch.equal(cut(tokens), m.output(m.norm(h)))
    assert cut.args.n_layers == 2 and [b.layer_id for b in cut.layers] == [0, 1]


def test_pruned_model_decodes_with_its_cache_like_its_full_forward():
    m = _model(n_layers=5)
    s = importance_scores(m, _tokens((2, 16)))
    cut = prune_model(m, s, kv_groups=5, ffn_fraction=0.25, n_layers=2)
    assert parameter_count(cut) < parameter_count(m) and len(cut.layers) == 3
    assert sum(layer.attention.n_kv_heads for layer in cut.layers) < 9
    tokens = _tokens((1, 14))
    with torch.no_grad():
        full = cut(tokens)
        steps = [cut(tokens[:, :6])[:, -1]] + [cut(tokens[:, i:i + 1], i)[:, -1] for i in range(6, 13)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 5:13], atol=1e-5)
    assert parameter_count(m) == sum(p.numel() for p in m.parameters())      # the original is untouched
    t = decode_timing(cut, prompt_len=4, n_tokens=2, repeats=1)
    assert t["prefill_ms"] > 0 and set(t) == {"prefill_ms", "decode_ms"}


def test_prune_model_keeps_a_group_per_layer_and_picks_the_least_important():
    m = _model()
    s = importance_scores(m, _tokens((2, 12)))
    s["kv_groups"] = [torch.tensor([0.1, 5.0, 6.0]), torch.tensor([0.01, 0.02, 0.03]),
                      torch.tensor([4.0, 0.2, 7.0]), torch.tensor([8.0, 9.0, 0.3])]
    cut = prune_model(m, s, kv_groups=5)
    assert [layer.attention.n_kv_heads for layer in cut.layers] == [2, 1, 2, 2]   # layer 1 keeps one group
    cut = prune_model(m, s, n_layers=1)
    assert len(cut.layers) == 3


def test_compare_to_reference_equals_compare_models():
    m, ids = _model(), _tokens((40,))
    pruned = magnitude_prune(copy.deepcopy(m), 0.3)
    got = compare_to_reference(pruned, ids, 16, reference_logits(m, ids, 16))
    want = compare_models(pruned, m, ids, 16)
    for key in ("perplexity", "kl", "top1", "n_tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-6)
    assert got["perplexity"] == pytest.approx(perplexity(pruned, ids, 16), rel=1e-6)
    with pytest.raises(ValueError, match="windows"):
        compare_to_reference(pruned, ids, 8, reference_logits(m, ids, 16))


@pytest.mark.parametrize("call, match", [
    (lambda m: remove_kv_groups(m, 0, [3]), "out of range"),
    (lambda m: remove_kv_groups(m, 0, [0, 1, 2]), "remove the layer instead"),
    (lambda m: remove_kv_groups(m, 4, [0]), "layer must be an int"),
    (lambda m: remove_kv_groups(m, 0, [1, 1]), "twice"),
    (lambda m: remove_ffn_channels(m, 0, [64]), "out of range"),
    (lambda m: remove_ffn_channels(m, 0, list(range(64))), "all 64 channels"),
    (lambda m: remove_layers(m, [0, 1, 2, 3]), "all 4 layers"),
    (lambda m: remove_layers(m, [-1]), "out of range"),
    (lambda m: prune_model(m, importance_scores(m, _tokens((1, 8))), kv_groups=9), "kv_groups"),
    (lambda m: prune_model(m, importance_scores(m, _tokens((1, 8))), n_layers=4), "n_layers"),
    (lambda m: prune_model(m, importance_scores(m, _tokens((1, 8))), ffn_fraction=1.0), "ffn_fraction"),
    (lambda m: prune_model(m, {"kv_groups": []}), "importance_scores"),
    (lambda m: median_ms(lambda: None, repeats=0), "repeats"),
])
def test_bad_cuts_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(_model())


def test_bad_index_types_raise_type_errors():
    with pytest.raises(TypeError, match="sequence of ints"):
        remove_kv_groups(_model(), 0, 1)
    with pytest.raises(TypeError, match="sequence of ints"):
        remove_layers(_model(), [0.5])


def test_importance_scores_refuse_a_mixture_of_experts():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=32, max_seq_len=16,
                     n_experts=4)
    with pytest.raises(TypeError, match="Mixture of Experts"):
        importance_scores(Transformer(args), _tokens((1, 4)) % 50)


# --- checkers ----------------------------------------------------------------------------------------------------

def test_checkers_pass_copies_of_the_reference():
    mask = source_copy(module, "_check_sparsity", "magnitude_mask")[1]
    assert check_magnitude_mask(mask)
    assert check_kv_group_importance(source_copy(module, "kv_group_importance"))
    import course_lib.checks.prune_distill as checks
    assert check_nm_mask(source_copy(checks, "_nm_reference"))


def test_checkers_refuse_the_library():
    assert refused(check_magnitude_mask(magnitude_mask), "magnitude_mask itself")
    assert refused(check_magnitude_mask(lambda w, s: magnitude_mask(w, s)), "course_lib.training.prune.magnitude_mask")
    assert refused(check_kv_group_importance(kv_group_importance), "kv_group_importance itself")
    assert refused(check_kv_group_importance(lambda o, w, n: kv_group_importance(o, w, n)), "kv_group_importance")
    assert refused(check_nm_mask(_nm_reference), "_nm_reference")


def test_checkers_catch_typical_mistakes():
    def by_value(w, s):                                       # ranks w, not |w|
        k = round(s * w.numel())
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[w.flatten().argsort()[:k]] = False
        return keep.view(w.shape)
    result = check_magnitude_mask(by_value)
    assert not result and "magnitude |w|" in str(result)

    def inverted(w, s):
        k = round(s * w.numel())
        pruned = torch.zeros(w.numel(), dtype=torch.bool)
        pruned[w.abs().flatten().argsort()[:k]] = True
        return pruned.view(w.shape)
    assert not check_magnitude_mask(inverted)                 # True marks the pruned ones

    def threshold(w, s):                                      # |w| > kth value: ties pruned together
        k = round(s * w.numel())
        return w.abs() > w.abs().flatten().kthvalue(k).values if k else torch.ones_like(w, dtype=torch.bool)
    result = check_magnitude_mask(threshold)
    assert not result and "ties" in str(result)

    def without_wo(o, w, n):
        return o.view(o.shape[0], n, -1).norm(dim=-1).mean(0)
    result = check_kv_group_importance(without_wo)
    assert not result and "through wo" in str(result)

    def per_head(o, w, n):                                    # groups of one head: wrong for GQA
        heads = w.shape[1] // 8 if w.shape[1] % 8 == 0 else n
        return torch.stack([(o[:, c] @ w[:, c].T).norm(dim=-1).mean()
                            for c in torch.arange(o.shape[1]).chunk(heads)])[:n]
    assert not check_kv_group_importance(per_head)

    def columns(w, n=2, m=4):                                 # groups down the columns
        return _nm_reference(w.T.contiguous(), n, m).T if w.shape[0] % m == 0 else torch.zeros_like(w, dtype=torch.bool)
    assert not check_nm_mask(columns)

    def smallest(w, n=2, m=4):
        return ~_nm_reference(w, m - n, m)
    result = check_nm_mask(smallest)
    assert not result
