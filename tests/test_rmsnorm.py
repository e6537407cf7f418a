"""RMSNorm (chapter 02) against independent references: torch.nn.RMSNorm, F.rms_norm, F.layer_norm
and Hugging Face's LlamaRMSNorm; edge cases; bad input; and the exercise checkers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import course_lib.rmsnorm as rmsnorm_module
from course_lib.checks.rmsnorm import check_RMSNorm, check_rms_norm, check_rms_norm_backward
from course_lib.rmsnorm import RMSNorm, rms_norm
from course_lib.validation import trusted_inputs
from shortcuts import refused, source_copy

LOW = (torch.bfloat16, torch.float16)


def _llama_rmsnorm():
    return pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm


def _make(cls, dim, eps, weight, dtype):
    m = cls(dim, eps=eps)
    with torch.no_grad():
        m.weight.copy_(weight)
    return m.to(dtype)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 48, generator=g) * torch.logspace(-2, 2, 7)[:, None]   # (batch, seq, dim)
    weight = 1 + 0.3 * torch.randn(48, generator=g)
    return x, weight


# ---------------------------------------------------------------- numerics against references
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_identical_to_llama_rmsnorm(data, dtype):
    x, weight = data
    ours = _make(RMSNorm, 48, 1e-5, weight, dtype)
    ref = _make(_llama_rmsnorm(), 48, 1e-5, weight, dtype)
    with torch.no_grad():
        a, e = ours(x.to(dtype)), ref(x.to(dtype))
    assert a.dtype == e.dtype == dtype
    assert torch.equal(a, e)


def test_mixed_dtypes_promote_like_llama_rmsnorm(data):
    x, weight = data                                   # float32 weight, bfloat16 activations
    ours, ref = _make(RMSNorm, 48, 1e-6, weight, torch.float32), _make(_llama_rmsnorm(), 48, 1e-6, weight, torch.float32)
    with torch.no_grad():
        a, e = ours(x.bfloat16()), ref(x.bfloat16())
    assert a.dtype == e.dtype == torch.float32 and torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_nn_rmsnorm(data, dtype):
    x, weight = data
    ours, ref = _make(RMSNorm, 48, 1e-5, weight, dtype), _make(nn.RMSNorm, 48, 1e-5, weight, dtype)
    with torch.no_grad():
        a, e = ours(x.to(dtype)), ref(x.to(dtype))
    assert a.dtype == e.dtype == dtype
    # torch's kernel rounds once, Meta's order twice: allow 2 units in the last place
    rtol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(a, e, rtol=rtol, atol=1e-6)


def test_float64_is_computed_in_float64(data):
    x, weight = data
    a = rms_norm(x.double(), weight.double(), 1e-6)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, F.rms_norm(x.double(), (48,), weight.double(), eps=1e-6), rtol=1e-12, atol=1e-12)


def test_rms_norm_of_centred_input_is_layer_norm(data):
    x, _ = data
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(rms_norm(centred, torch.ones(48), 1e-5), F.layer_norm(x, (48,), eps=1e-5),
                               rtol=1e-5, atol=1e-5)


def test_gradients_match_llama_rmsnorm(data):
    x, weight = data
    grads = []
    for cls in (RMSNorm, _llama_rmsnorm()):
        m, xx = _make(cls, 48, 1e-5, weight, torch.float32), x.clone().requires_grad_()
        m(xx).pow(2).sum().backward()
        grads.append((xx.grad, m.weight.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_module_and_function_agree(data):
    x, weight = data
    m = _make(RMSNorm, 48, 1e-4, weight, torch.float32)
    assert torch.equal(m(x), rms_norm(x, m.weight, 1e-4))


# ---------------------------------------------------------------- edge cases and properties
def test_float16_outliers_do_not_overflow():
    x = torch.ones(2, 64, dtype=torch.float16)
    x[:, 5] = torch.tensor([300.0, -1000.0])           # x² overflows float16 (max 65504)
    w = torch.ones(64, dtype=torch.float16)
    out = rms_norm(x, w)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = (x.float() / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).half()
    assert torch.equal(out, expected)
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)   # the bug the upcast prevents
    assert (naive == 0).all()


def test_zero_input_gives_zeros():
    out = RMSNorm(16)(torch.zeros(3, 16))
    assert torch.equal(out, torch.zeros(3, 16))


def test_shapes_1d_and_empty_batch():
    m = RMSNorm(8)
    assert m(torch.randn(8)).shape == (8,)
    assert m(torch.randn(0, 8)).shape == (0, 8)
    assert m(torch.randn(2, 3, 4, 8)).shape == (2, 3, 4, 8)


def test_scale_invariant_and_length_sqrt_dim():
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(1))
    w = torch.ones(576)
    torch.testing.assert_close(rms_norm(37.0 * x, w, 1e-6), rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rms_norm(x, w, 1e-9).norm(dim=-1), torch.full((4,), math.sqrt(576)), rtol=1e-5, atol=0)


def test_meta_names_and_repr():
    m = RMSNorm(576, eps=1e-5)
    assert list(m.state_dict()) == ["weight"] and torch.equal(m.weight, torch.ones(576))
    assert repr(m) == "RMSNorm(576, eps=1e-05)"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, err, match", [
    ((0,), ValueError, r"dim must be a positive int, got 0"),
    ((-3,), ValueError, r"dim must be a positive int, got -3"),
    ((8.0,), TypeError, r"dim must be a positive int, got float 8\.0"),
    ((True,), TypeError, r"dim must be a positive int, got bool"),
    ((8, 0.0), ValueError, r"eps must be positive, got 0\.0"),
    ((8, -1e-6), ValueError, r"eps must be positive, got -1e-06"),
    ((8, float("nan")), ValueError, r"eps must be positive, got nan"),
    ((8, "1e-6"), TypeError, r"eps must be a float, got str"),
])
def test_constructor_rejects_bad_arguments(args, err, match):
    with pytest.raises(err, match=match):
        RMSNorm(*args)


def test_forward_rejects_wrong_last_dim_and_integer_input():
    m = RMSNorm(8)
    with pytest.raises(ValueError, match=r"x has last dimension 7, expected dim=8"):
        m(torch.randn(2, 7))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        m(torch.ones(2, 8, dtype=torch.long))


@pytest.mark.parametrize("x, weight, eps, err, match", [
    (torch.randn(2, 8), torch.ones(5), 1e-6, ValueError, r"weight has shape \(5,\), expected \(8,\).*\(2, 8\)"),
    (torch.randn(2, 8), torch.ones(1, 8), 1e-6, ValueError, r"weight has shape \(1, 8\), expected \(8,\)"),
    ([1.0, 2.0], torch.ones(2), 1e-6, TypeError, r"x must be a torch.Tensor, got list"),
    (torch.tensor(3.0), torch.ones(1), 1e-6, ValueError, r"x must have at least one dimension"),
    (torch.randn(2, 8), [1.0] * 8, 1e-6, TypeError, r"weight must be a torch.Tensor, got list"),
    (torch.randn(2, 8), torch.ones(8), 0, ValueError, r"eps must be positive, got 0"),
    (torch.randn(2, 8), torch.ones(8), None, TypeError, r"eps must be a float, got NoneType"),
])
def test_rms_norm_rejects_bad_arguments(x, weight, eps, err, match):
    with pytest.raises(err, match=match):
        rms_norm(x, weight, eps)
    with trusted_inputs(), pytest.raises(err, match=match):   # a function called directly always checks
        rms_norm(x, weight, eps)


# ---------------------------------------------------------------- inputs checked once (issue 15)
@pytest.mark.parametrize("x, err, match", [
    (torch.randn(2, 7), ValueError, r"x has last dimension 7, expected dim=8"),
    (torch.ones(2, 8, dtype=torch.long), TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
    (torch.ones(2, 7, dtype=torch.long), ValueError, r"x has last dimension 7, expected dim=8"),
    ([1.0] * 8, TypeError, r"x must be a torch.Tensor, got list"),
    (torch.tensor(3.0), ValueError, r"x must have at least one dimension"),
    (torch.tensor(3), TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
])
def test_layer_called_directly_names_every_bad_input(x, err, match):
    m = RMSNorm(8)
    with pytest.raises(err, match=match):
        m(x)
    with trusted_inputs():
        pass
    with pytest.raises(err, match=match):                     # the trusted block is over: checked again
        m(x)


def test_layer_skips_its_check_inside_trusted_inputs(monkeypatch):
    m, x = RMSNorm(8), torch.randn(2, 3, 8)
    expected = m(x)

    def refuse(*args):
        raise AssertionError("RMSNorm.forward checked its input inside trusted_inputs()")
    monkeypatch.setattr(rmsnorm_module, "_check_layer_input", refuse)
    with trusted_inputs():
        assert torch.equal(m(x), expected)                    # the check was not called
    with pytest.raises(AssertionError, match="checked its input"):
        m(x)                                                  # called directly, it is


def test_checks_never_read_tensor_values():
    "Meta tensors have shapes and dtypes but no values: a check that reads one (.item(), bool(), int()) fails."
    x = torch.empty(2, 3, 8, device="meta")
    assert rms_norm(x, torch.empty(8, device="meta")).shape == (2, 3, 8)
    assert RMSNorm(8).to("meta")(x).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="x has last dimension 7"):
        RMSNorm(8).to("meta")(torch.empty(2, 7, device="meta"))


# ---------------------------------------------------------------- checkers: accept right answers
def test_checkers_pass_copies_of_the_reference_and_independent_implementations():
    import course_lib.rmsnorm as module
    _, own_rms_norm, own_layer = source_copy(module, "_rms_norm", "rms_norm", "RMSNorm")
    assert check_rms_norm(own_rms_norm) and check_RMSNorm(own_layer)
    assert check_RMSNorm(_llama_rmsnorm())             # Hugging Face's layer, written out


def test_checkers_refuse_the_library_and_pytorch_answers():
    "Issue 16: nn.RMSNorm passed check.RMSNorm and F.rms_norm passed check.rms_norm."
    assert refused(check_rms_norm(rms_norm), "course_lib.rmsnorm.rms_norm")
    assert refused(check_RMSNorm(RMSNorm), "course_lib.rmsnorm.RMSNorm")
    assert refused(check_rms_norm(lambda x, w, eps: F.rms_norm(x.float(), x.shape[-1:], eps=eps).type_as(x) * w),
                   "torch.nn.functional.rms_norm")
    assert refused(check_rms_norm(lambda x, w, eps: torch.rms_norm(x, x.shape[-1:], w, eps)), "torch.rms_norm")
    assert refused(check_RMSNorm(nn.RMSNorm), "is torch.nn.modules.normalization.RMSNorm itself")

    class Wrapped(nn.Module):                          # hides PyTorch's layer inside its own
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.inner = nn.RMSNorm(dim, eps=eps)
            self.weight = self.inner.weight

        def forward(self, x):
            return self.inner(x)
    assert refused(check_RMSNorm(Wrapped), "torch.nn.modules.normalization.RMSNorm")

    class Derived(RMSNorm):                            # inherits the answer
        pass
    assert refused(check_RMSNorm(Derived), "derives from course_lib.rmsnorm.RMSNorm")

    def caught(x, w, eps):                             # catching the refusal does not help
        try:
            return rms_norm(x, w, eps)
        except RuntimeError:
            return rms_norm(x, w, eps)
    assert refused(check_rms_norm(caught), "course_lib.rmsnorm.rms_norm")


def test_backward_checker_refuses_autograd():
    def by_autograd(x, weight, grad_out, eps=1e-6):
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
        return torch.autograd.grad(y, (x, weight), grad_out)
    assert refused(check_rms_norm_backward(by_autograd), "torch.autograd.grad")


def manual_backward(x, weight, grad_out, eps=1e-6):
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xhat, gw = x * r, grad_out * weight
    grad_x = r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    return grad_x, (grad_out * xhat).reshape(-1, x.shape[-1]).sum(0)


def test_backward_checker_passes_the_derivation():
    result = check_rms_norm_backward(manual_backward)
    assert result, str(result)


# ---------------------------------------------------------------- checkers: catch wrong answers
def _layer(forward, weight_as_buffer=False):
    "A candidate class whose forward is `forward(self, x)`."
    class Candidate(nn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.eps = eps
            if weight_as_buffer:
                self.register_buffer("weight", torch.ones(dim))
            else:
                self.weight = nn.Parameter(torch.ones(dim))
        def forward(self, x):
            return forward(self, x)
    return Candidate


def _ms(x, dim=-1):
    return x.pow(2).mean(dim, keepdim=True)


WRONG_LAYERS = {
    "no_upcast": (lambda s, x: x * torch.rsqrt(_ms(x) + s.eps) * s.weight,
                  ["x² overflows", "float16 max is 65504", "x (2, 64) with values 300"]),
    "layer_norm_style": (lambda s, x: F.layer_norm(x.float(), x.shape[-1:], eps=s.eps).type_as(x) * s.weight,
                         ["subtracts the mean first: that is LayerNorm"]),
    "forgets_weight": (lambda s, x: (x.float() * torch.rsqrt(_ms(x.float()) + s.eps)).type_as(x),
                       ["forgets to multiply by the weight"]),
    "missing_eps": (lambda s, x: (x.float() * torch.rsqrt(_ms(x.float()))).type_as(x) * s.weight,
                    ["all-zero x (2, 64): layer(x) has NaN", "add eps to mean(x²)", "ignores eps"]),
    "eps_outside_sqrt": (lambda s, x: (x.float() / (_ms(x.float()).sqrt() + s.eps)).type_as(x) * s.weight,
                         ["adds eps outside the square root"]),
    "wrong_axis": (lambda s, x: (x.float() * torch.rsqrt(_ms(x.float(), 0) + s.eps)).type_as(x) * s.weight,
                   ["averages x² over dimension 0"]),
    "no_cast_back": (lambda s, x: x.float() * torch.rsqrt(_ms(x.float()) + s.eps) * s.weight.float(),
                     ["has dtype torch.float32, expected torch.float16", "cast the normalised x back"]),
    "detached_weight": (lambda s, x: (x.float() * torch.rsqrt(_ms(x.float()) + s.eps)).type_as(x) * s.weight.detach(),
                        ["no gradient reached the weight"]),
}


@pytest.mark.parametrize("name", WRONG_LAYERS)
def test_check_RMSNorm_catches_mistake(name):
    forward, expected_bits = WRONG_LAYERS[name]
    result = check_RMSNorm(_layer(forward))
    text = str(result)
    assert not result and text.startswith("❌ RMSNorm: failed")
    for bit in expected_bits:
        assert bit in text, f"{bit!r} not in:\n{text}"


def test_check_RMSNorm_catches_weight_that_is_not_a_parameter():
    ok_forward = lambda s, x: (x.float() * torch.rsqrt(_ms(x.float()) + s.eps)).type_as(x) * s.weight
    text = str(check_RMSNorm(_layer(ok_forward, weight_as_buffer=True)))
    assert "`weight` is a Tensor, not an nn.Parameter" in text


def test_check_rms_norm_catches_mistakes():
    no_upcast = lambda x, w, eps: x * torch.rsqrt(_ms(x) + eps) * w
    layer_style = lambda x, w, eps: F.layer_norm(x.float(), x.shape[-1:], eps=eps).type_as(x) * w
    hard_coded_eps = lambda x, w, eps: (x.float() * torch.rsqrt(_ms(x.float()) + 1e-6)).type_as(x) * w
    no_eps = lambda x, w, eps: (x.float() * torch.rsqrt(_ms(x.float()))).type_as(x) * w
    wrong_axis = lambda x, w, eps: (x.float() * torch.rsqrt(_ms(x.float(), 0) + eps)).type_as(x) * w
    for candidate, bit in [(no_upcast, "x² overflows"), (layer_style, "that is LayerNorm"),
                           (hard_coded_eps, "eps dominates: rms_norm(x, weight, eps) differs"),
                           (no_eps, "all-zero x (2, 64): rms_norm(x, weight, eps) has NaN"),
                           (wrong_axis, "averages x² over dimension 0 instead of the last dimension")]:
        result = check_rms_norm(candidate)
        assert not result and bit in str(result), str(result)
    assert "ignores eps" in str(check_rms_norm(hard_coded_eps))


def test_check_rms_norm_backward_catches_mistakes():
    def rms_constant(x, w, G, eps=1e-6):
        r = torch.rsqrt(_ms(x) + eps)
        return G * w * r, (G * x * r).reshape(-1, x.shape[-1]).sum(0)
    def weight_grad_not_summed(x, w, G, eps=1e-6):
        gx, _ = manual_backward(x, w, G, eps)
        return gx, (G * x * torch.rsqrt(_ms(x) + eps)).sum(0)
    def uses_x_not_xhat(x, w, G, eps=1e-6):
        gx, _ = manual_backward(x, w, G, eps)
        return gx, (G * x).reshape(-1, x.shape[-1]).sum(0)
    for candidate, bit in [(rms_constant, "treats the RMS as a constant"),
                           (weight_grad_not_summed, "grad_weight has shape (5, 16), expected (16,)"),
                           (uses_x_not_xhat, "uses x instead of the normalised x̂")]:
        result = check_rms_norm_backward(candidate)
        assert not result and bit in str(result), str(result)


def test_stubs_get_one_clean_line_and_bad_candidates_raise():
    def stub(*args, **kwargs):
        raise NotImplementedError
    for checker in (check_rms_norm, check_RMSNorm, check_rms_norm_backward):
        result = checker(stub)
        assert not result and len(result.failures) == 1
        assert "raised NotImplementedError" in str(result)
    with pytest.raises(TypeError, match="candidate should be a function or class"):
        check_rms_norm("rms_norm")
