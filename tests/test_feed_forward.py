"""Chapter 05: the SwiGLU feed-forward network against independent references (published Llama sizes,
PyTorch's own ops, Hugging Face's LlamaMLP), its input validation, and its exercise checkers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import course_lib.feed_forward as feed_forward_module
from course_lib.checking import CheckResult
from course_lib.checks.feed_forward import check_FeedForward, check_llama_hidden_dim, check_swiglu_backward
from course_lib.feed_forward import FeedForward, llama_hidden_dim
from course_lib.fused import FusedFeedForward
from shortcuts import refused, source_copy

# fresh copies of the reference (what a student who retyped it hands in): the checkers refuse the library's own
own_llama_hidden_dim = source_copy(feed_forward_module, "_check_positive_int", "llama_hidden_dim")[-1]
OwnFeedForward = source_copy(feed_forward_module, "FeedForward")


# ---------------------------------------------------------------- llama_hidden_dim

# (dim, multiple_of, ffn_dim_multiplier) from each model's params.json -> intermediate_size in its config.json
PUBLISHED = {
    "Llama-2-7B": ((4096, 256, None), 11008),
    "Llama-2-13B": ((5120, 256, None), 13824),
    "Llama-2-70B": ((8192, 4096, 1.3), 28672),
    "Llama-3-8B": ((4096, 1024, 1.3), 14336),
    "Llama-3-70B": ((8192, 4096, 1.3), 28672),
    "Llama-3.2-1B": ((2048, 256, 1.5), 8192),
    "SmolLM2-135M": ((576, 256, None), 1536),
}


@pytest.mark.parametrize("model", PUBLISHED)
def test_llama_hidden_dim_matches_published_sizes(model):
    args, size = PUBLISHED[model]
    assert llama_hidden_dim(*args) == size


def test_llama_hidden_dim_defaults_and_type():
    out = llama_hidden_dim(4096)
    assert out == 11008 and type(out) is int
    assert llama_hidden_dim(4096, ffn_dim_multiplier=1.0) == 11008


@pytest.mark.parametrize("dim", [1, 3, 64, 100, 384, 576, 1000, 4097])
@pytest.mark.parametrize("multiple_of", [1, 8, 64, 256])
def test_llama_hidden_dim_is_smallest_multiple_at_least_two_thirds_of_4dim(dim, multiple_of):
    out = llama_hidden_dim(dim, multiple_of)
    raw = (8 * dim) // 3                       # exact integer floor of 2/3 · 4 · dim
    assert out % multiple_of == 0 and raw <= out < raw + multiple_of


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(dim=0), ValueError, r"dim must be a positive int, got dim=0"),
    (dict(dim=-4), ValueError, r"dim=-4"),
    (dict(dim=4096, multiple_of=0), ValueError, r"multiple_of=0"),
    (dict(dim=4096.0), TypeError, r"dim must be a positive int, got float 4096\.0"),
    (dict(dim=True), TypeError, r"dim must be a positive int, got bool"),
    (dict(dim=4096, multiple_of="256"), TypeError, r"multiple_of .*str"),
    (dict(dim=4096, ffn_dim_multiplier=0.0), ValueError, r"ffn_dim_multiplier must be positive, got ffn_dim_multiplier=0\.0"),
    (dict(dim=4096, ffn_dim_multiplier=-1.3), ValueError, r"ffn_dim_multiplier=-1\.3"),
    (dict(dim=4096, ffn_dim_multiplier="1.3"), TypeError, r"ffn_dim_multiplier must be a number or None, got str"),
    (dict(dim=1, ffn_dim_multiplier=0.1), ValueError, r"ffn_dim_multiplier=0\.1 .*dim=1 to 0"),
])
def test_llama_hidden_dim_bad_input(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        llama_hidden_dim(**kwargs)


# ---------------------------------------------------------------- FeedForward

def hf_pair(dim, hidden_dim, seed=0, dtype=torch.float32):
    "A Hugging Face LlamaMLP and our FeedForward with the same weights."
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(seed)
    hf = LlamaMLP(transformers.LlamaConfig(hidden_size=dim, intermediate_size=hidden_dim,
                                           hidden_act="silu", mlp_bias=False,
                                           num_attention_heads=1, num_key_value_heads=1)).to(dtype).eval()
    ours = FeedForward(dim, hidden_dim).to(dtype)
    ours.load_state_dict({"w1.weight": hf.gate_proj.weight, "w2.weight": hf.down_proj.weight,
                          "w3.weight": hf.up_proj.weight})
    return hf, ours


@pytest.mark.parametrize("dim, hidden_dim, x_shape", [
    (64, 172, (2, 7, 64)),       # batch, seq, dim
    (40, 77, (5, 40)),           # odd hidden size, 2-D input
    (576, 1536, (1, 3, 576)),    # SmolLM2-135M
    (24, 64, (24,)),             # one token, no batch dims
    (16, 48, (2, 3, 4, 16)),     # extra leading dims
])
def test_matches_hf_llama_mlp(dim, hidden_dim, x_shape):
    hf, ours = hf_pair(dim, hidden_dim)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-5)


def test_matches_hf_llama_mlp_float64_and_bfloat16():
    hf, ours = hf_pair(32, 96, dtype=torch.float64)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), atol=1e-12, rtol=1e-12)
    hf, ours = hf_pair(32, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        out = ours(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, hf(x.bfloat16()))


def test_gradients_match_hf():
    hf, ours = hf_pair(16, 40, dtype=torch.float64)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    ours(x).square().sum().backward()
    hf(x).square().sum().backward()
    for mine, theirs in [("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")]:
        torch.testing.assert_close(getattr(ours, mine).weight.grad, getattr(hf, theirs).weight.grad)


def test_matches_formula_with_pytorch_ops():
    torch.manual_seed(0)
    ffn = FeedForward(12, 30)
    x = torch.randn(4, 12)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    gate = x @ w1.T
    expected = ((gate * torch.sigmoid(gate)) * (x @ w3.T)) @ w2.T   # SiLU(x) = x·σ(x)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected)


def test_tokens_are_independent_and_zero_maps_to_zero():
    torch.manual_seed(0)
    ffn = FeedForward(16, 48)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        out = ffn(x)
        torch.testing.assert_close(out[1, 4], ffn(x[1, 4]))
        assert torch.equal(ffn(torch.zeros(3, 16)), torch.zeros(3, 16))
        assert ffn(torch.empty(0, 5, 16)).shape == (0, 5, 16)


def test_parameters_meta_names_shapes_no_bias():
    ffn = FeedForward(8, 20)
    assert {n: tuple(p.shape) for n, p in ffn.named_parameters()} == {
        "w1.weight": (20, 8), "w2.weight": (8, 20), "w3.weight": (20, 8)}
    assert all(getattr(ffn, n).bias is None for n in ("w1", "w2", "w3"))
    assert (ffn.dim, ffn.hidden_dim) == (8, 20)


@pytest.mark.parametrize("args, exc, pattern", [
    ((0, 16), ValueError, r"dim must be a positive int, got dim=0"),
    ((8, -1), ValueError, r"hidden_dim must be a positive int, got hidden_dim=-1"),
    ((8, 16.0), TypeError, r"hidden_dim must be a positive int, got float"),
    ((None, 16), TypeError, r"dim must be a positive int, got NoneType"),
])
def test_feed_forward_bad_constructor_args(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FeedForward(*args)


def test_feed_forward_bad_input():
    ffn = FeedForward(8, 16)
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 7\); its last dimension must equal dim=8"):
        ffn(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"x has shape \(\).*dim=8"):
        ffn(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        ffn([0.0] * 8)


# ---------------------------------------------------------------- check_llama_hidden_dim

def _stub(dim, multiple_of=256, ffn_dim_multiplier=None):
    raise NotImplementedError


def _base(dim, ffn_dim_multiplier):
    h = int(2 * 4 * dim / 3)
    return int(ffn_dim_multiplier * h) if ffn_dim_multiplier is not None else h


def no_two_thirds(dim, multiple_of=256, ffn_dim_multiplier=None):
    h = 4 * dim if ffn_dim_multiplier is None else int(ffn_dim_multiplier * 4 * dim)
    return multiple_of * -(-h // multiple_of)


def rounds_down(dim, multiple_of=256, ffn_dim_multiplier=None):
    return multiple_of * (_base(dim, ffn_dim_multiplier) // multiple_of)


def multiplier_after_rounding(dim, multiple_of=256, ffn_dim_multiplier=None):
    h = int(2 * 4 * dim / 3)
    h = multiple_of * -(-h // multiple_of)
    return int(ffn_dim_multiplier * h) if ffn_dim_multiplier is not None else h


def ignores_multiple_of(dim, multiple_of=256, ffn_dim_multiplier=None):
    return _base(dim, ffn_dim_multiplier)


def returns_float(dim, multiple_of=256, ffn_dim_multiplier=None):
    return float(own_llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier))


def test_check_llama_hidden_dim_passes_a_copy_of_the_course_implementation():
    result = check_llama_hidden_dim(own_llama_hidden_dim)
    assert isinstance(result, CheckResult) and result and "passed all 9 cases" in str(result)


def test_check_llama_hidden_dim_refuses_the_library():
    assert refused(check_llama_hidden_dim(llama_hidden_dim), "course_lib.feed_forward.llama_hidden_dim")
    wrapped = lambda dim, multiple_of=256, ffn_dim_multiplier=None: llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
    assert refused(check_llama_hidden_dim(wrapped), "course_lib.feed_forward.llama_hidden_dim")


@pytest.mark.parametrize("candidate, diagnosis, failing_case", [
    (no_two_thirds, "forgot the 2/3", "Llama-2-7B"),
    (rounds_down, "rounded down instead of up", "got 10752, expected 11008"),
    (multiplier_after_rounding, "applied ffn_dim_multiplier after rounding", "Llama-2-70B"),
    (ignores_multiple_of, "ignored multiple_of", "got 10922, expected 11008"),
])
def test_check_llama_hidden_dim_names_the_mistake(candidate, diagnosis, failing_case):
    result = check_llama_hidden_dim(candidate)
    assert not result
    text = str(result)
    assert diagnosis in text and failing_case in text


def test_check_llama_hidden_dim_multiplier_after_rounding_only_fails_multiplier_cases():
    result = check_llama_hidden_dim(multiplier_after_rounding)
    failed = [description for description, _, _ in result.failures]
    assert failed and all("ffn_dim_multiplier" in d for d in failed)
    assert "got 31948, expected 28672" in str(result)


def test_check_llama_hidden_dim_rejects_floats():
    result = check_llama_hidden_dim(returns_float)
    assert not result and "returned float 11008.0; expected the int 11008" in str(result)


def test_check_llama_hidden_dim_stub_gives_one_line():
    result = check_llama_hidden_dim(_stub)
    assert not result and len(result.failures) == 1
    assert "raised NotImplementedError" in str(result)


def test_check_llama_hidden_dim_never_prints_the_solution():
    text = str(check_llama_hidden_dim(rounds_down))
    assert "multiple_of - 1" not in text and "+ multiple_of" not in text


# ---------------------------------------------------------------- check_FeedForward

def make_ffn(fwd, bias=False, w2_shape=None, with_w3=True):
    "A candidate class with the given forward(self, x) and, optionally, wrong layers."
    class Candidate(nn.Module):
        def __init__(self, dim, hidden_dim):
            super().__init__()
            self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
            self.w2 = nn.Linear(*(w2_shape(dim, hidden_dim) if w2_shape else (hidden_dim, dim)), bias=False)
            if with_w3:
                self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

        def forward(self, x): return fwd(self, x)
    return Candidate


Swapped = make_ffn(lambda m, x: m.w2(F.silu(m.w3(x)) * m.w1(x)))
ReLUGate = make_ffn(lambda m, x: m.w2(F.relu(m.w1(x)) * m.w3(x)))
GELUGate = make_ffn(lambda m, x: m.w2(F.gelu(m.w1(x)) * m.w3(x)))
NoGate = make_ffn(lambda m, x: m.w2(F.silu(m.w1(x))), with_w3=False)
UnusedGate = make_ffn(lambda m, x: m.w2(F.silu(m.w1(x))))
WithBias = make_ffn(lambda m, x: m.w2(F.silu(m.w1(x)) * m.w3(x)), bias=True)
TransposedW2 = make_ffn(lambda m, x: (F.silu(m.w1(x)) * m.w3(x)) @ m.w2.weight, w2_shape=lambda d, h: (d, h))
AlwaysFloat32 = make_ffn(lambda m, x: m.w2(F.silu(m.w1(x)) * m.w3(x)).float())


class Stub(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        raise NotImplementedError


def test_check_feed_forward_passes_course_implementation():
    result = check_FeedForward(OwnFeedForward)
    assert result and "passed all 5 cases" in str(result)


def test_check_feed_forward_refuses_the_library_and_its_fused_variant():
    assert refused(check_FeedForward(FeedForward), "is course_lib.feed_forward.FeedForward itself")

    class Derived(FeedForward):
        pass
    assert refused(check_FeedForward(Derived), "derives from course_lib.feed_forward.FeedForward")

    class Delegating(nn.Module):  # builds the library's layer inside its own
        def __init__(self, dim, hidden_dim):
            super().__init__()
            self.inner = FeedForward(dim, hidden_dim)
            self.w1, self.w2, self.w3 = self.inner.w1, self.inner.w2, self.inner.w3

        def forward(self, x): return self.inner(x)
    assert refused(check_FeedForward(Delegating), "course_lib.feed_forward.FeedForward")

    class Fused(nn.Module):  # chapter 07c's fused layer, fed the weights of its own copy of the layer
        def __init__(self, dim, hidden_dim):
            super().__init__()
            self.w1, self.w2, self.w3 = (getattr(OwnFeedForward(dim, hidden_dim), n) for n in ("w1", "w2", "w3"))

        def forward(self, x):
            plain = OwnFeedForward(self.w1.in_features, self.w1.out_features).to(x.dtype)
            plain.w1, plain.w2, plain.w3 = self.w1, self.w2, self.w3
            return FusedFeedForward(plain)(x)
    assert refused(check_FeedForward(Fused), "course_lib.fused.FusedFeedForward")


def test_check_feed_forward_passes_equivalent_rewrite():
    manual = make_ffn(lambda m, x: F.linear(m.w1(x) * torch.sigmoid(m.w1(x)) * m.w3(x), m.w2.weight))
    assert check_FeedForward(manual)


@pytest.mark.parametrize("candidate, expected", [
    (Swapped, "w1 and w3 swapped: the gate is on the wrong branch"),
    (ReLUGate, "ReLU is used instead of SiLU"),
    (GELUGate, "GELU is used instead of SiLU"),
    (UnusedGate, "the gate is missing"),
    (NoGate, "has no attribute w3 (the up projection"),
    (WithBias, "w1 and w3 have biases"),
    (TransposedW2, "w2.weight has shape (12, 8), expected (8, 12)"),
    (AlwaysFloat32, "has dtype torch.float32, expected torch.float64"),
])
def test_check_feed_forward_names_the_mistake(candidate, expected):
    result = check_FeedForward(candidate)
    assert not result and expected in str(result), str(result)


def test_check_feed_forward_wrong_layers_reported_once():
    result = check_FeedForward(TransposedW2)
    assert len(result.failures) == 1 and "(the other cases run once this one passes)" in str(result)


def test_check_feed_forward_value_failures_show_where_and_by_how_much():
    text = str(check_FeedForward(Swapped))
    assert "largest error" in text and "expected" in text and "output for x of shape (2, 5, 8)" in text


def test_check_feed_forward_stub_and_non_class():
    result = check_FeedForward(Stub)
    assert not result and len(result.failures) == 1 and "raised NotImplementedError" in str(result)
    with pytest.raises(TypeError, match="candidate should be a function or class"):
        check_FeedForward(42)


def test_checkers_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    check_FeedForward(OwnFeedForward)
    check_FeedForward(Swapped)
    check_llama_hidden_dim(own_llama_hidden_dim)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- check_swiglu_backward (exercise 3)

def swiglu_backward(a, b, grad_h):
    "The answer to exercise 3: h = silu(a)·b; silu'(a) = σ(a)·(1 + a·(1 - σ(a))) by the product rule."
    s = torch.sigmoid(a)                                  # finite for any a, unlike exp(a) / (1 + exp(a))
    return grad_h * b * s * (1 + a * (1 - s)), grad_h * a * s


def test_swiglu_backward_answer_matches_autograd():
    a, b, g = (torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    (F.silu(a_) * b_).backward(g)
    ga, gb = swiglu_backward(a, b, g)
    torch.testing.assert_close(ga, a_.grad)
    torch.testing.assert_close(gb, b_.grad)


def test_check_swiglu_backward_passes_the_answer():
    result = check_swiglu_backward(swiglu_backward)
    assert result and "passed all 4 cases" in str(result)


def _by_autograd(a, b, grad_h):
    a, b = a.requires_grad_(), b.requires_grad_()
    return torch.autograd.grad(F.silu(a) * b, (a, b), grad_h)


def _by_backward(a, b, grad_h):
    a, b = a.requires_grad_(), b.requires_grad_()
    (F.silu(a) * b).backward(grad_h)
    return a.grad, b.grad


def _by_vjp(a, b, grad_h):
    return torch.func.vjp(lambda a, b: F.silu(a) * b, a, b)[1](grad_h)


@pytest.mark.parametrize("shortcut,name", [
    (_by_autograd, "torch.autograd.grad"), (_by_backward, "Tensor.backward"), (_by_vjp, "torch.autograd.grad"),
])
def test_check_swiglu_backward_refuses_autograd(shortcut, name):
    assert refused(check_swiglu_backward(shortcut), name), str(check_swiglu_backward(shortcut))


def _naive_sigmoid(a, b, grad_h):
    s = torch.exp(a) / (1 + torch.exp(a))
    return grad_h * b * s * (1 + a * (1 - s)), grad_h * a * s


@pytest.mark.parametrize("wrong,message", [
    (lambda a, b, g: (g * b * torch.sigmoid(a), g * F.silu(a)), "uses σ(a) as SiLU's derivative"),
    (lambda a, b, g: (g * b * torch.sigmoid(a) * (1 - torch.sigmoid(a)), g * F.silu(a)), "the sigmoid's derivative"),
    (lambda a, b, g: (swiglu_backward(a, b, g)[0] / b, g * F.silu(a)), "forgets the factor b"),
    (lambda a, b, g: (swiglu_backward(a, b, g)[0], g * a), "uses a instead of SiLU(a)"),
    (lambda a, b, g: (swiglu_backward(a, b, g)[0], g), "leaves out SiLU(a)"),
    (lambda a, b, g: swiglu_backward(a, b, g)[0], "should return a pair"),
    (lambda a, b, g: tuple(t.double() for t in swiglu_backward(a, b, g)), "dtype torch.float64, expected torch.float32"),
    (_naive_sigmoid, "large pre-activations, |a| up to 1000, float64: grad_a has NaN"),
])
def test_check_swiglu_backward_catches_mistakes(wrong, message):
    result = check_swiglu_backward(wrong)
    assert not result and message in str(result), str(result)

