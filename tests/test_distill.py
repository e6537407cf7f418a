"""Chapter 13b, distillation: kd_loss against F.kl_div / F.cross_entropy, its gradient, the loss_fn for train(),
recovered_fraction, bad input, and the kd_loss checker."""
import pytest
import torch
import torch.nn.functional as F

import course_lib.training.distill as module
from course_lib.checks.prune_distill import check_kd_loss
from course_lib.model import ModelArgs, Transformer
from course_lib.training.distill import distillation_loss, kd_loss, recovered_fraction
from shortcuts import refused, source_copy


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _reference(s, t, y, T, alpha):
    v, c = s.shape[-1], (y != -100)
    kl = F.kl_div(F.log_softmax(s[c] / T, -1), F.log_softmax(t[c] / T, -1), log_target=True, reduction="batchmean")
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s.reshape(-1, v), y.reshape(-1))


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_loss_equals_kl_div_and_cross_entropy(T, alpha):
    s, t = _logits(3, 5, 17), _logits(3, 5, 17, seed=1)
    y = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(2))
    y[1, 2:] = -100
    assert torch.allclose(kd_loss(s, t, y, T, alpha), _reference(s, t, y, T, alpha), atol=1e-5)


def test_alpha_zero_is_cross_entropy_and_one_is_scaled_kl():
    s, t = _logits(8, 11), _logits(8, 11, seed=3)
    y = torch.randint(0, 11, (8,))
    assert torch.allclose(kd_loss(s, t, y, 3.0, 0.0), F.cross_entropy(s, y))
    kl = (F.softmax(t / 3, -1) * (F.log_softmax(t / 3, -1) - F.log_softmax(s / 3, -1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, y, 3.0, 1.0), 9 * kl, atol=1e-6)
    assert kd_loss(t, t, y, 2.0, 1.0).abs() < 1e-6                       # student = teacher: no KL


def test_temperature_softens_and_t_squared_keeps_the_gradient_scale():
    s, t, y = _logits(64, 50), _logits(64, 50, seed=4), torch.zeros(64, dtype=torch.long)
    norms = []
    for T in (1.0, 8.0):
        st = s.clone().requires_grad_(True)
        kd_loss(st, t, y, T, 1.0).backward()
        norms.append(st.grad.norm().item())
    # the soft term's gradient scales as 1/T² before the T² factor; with it, the two stay within a small factor
    assert 0.1 < norms[1] / norms[0] < 10


def test_gradient_reaches_the_student_only():
    s, t = _logits(4, 9).requires_grad_(True), _logits(4, 9, seed=5).requires_grad_(True)
    kd_loss(s, t, torch.arange(4), 2.0, 0.5).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_distillation_loss_is_a_loss_fn_for_train():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=48, max_seq_len=32)
    teacher, student = Transformer(args), Transformer(args)
    x, y = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    loss = distillation_loss(teacher, 2.0, 0.5)(student, x, y)
    with torch.no_grad():
        want = _reference(student(x), teacher(x), y, 2.0, 0.5)
    assert torch.allclose(loss, want, atol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.output.weight.grad is not None
    loss = distillation_loss(teacher, 2.0, 0.5)(student, x, y)           # a second step: its own graph
    loss.backward()


def test_recovered_fraction():
    assert recovered_fraction(30.0, 80.0, 55.0) == pytest.approx(0.5)
    assert recovered_fraction(30.0, 80.0, 30.0) == 1.0 and recovered_fraction(30.0, 80.0, 90.0) < 0
    with pytest.raises(ValueError, match="lost nothing"):
        recovered_fraction(30.0, 30.0, 31.0)
    with pytest.raises(ValueError, match="ppl_after"):
        recovered_fraction(30.0, 40.0, float("nan"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(alpha=True), ValueError, "alpha"),
    (dict(teacher_logits=torch.zeros(4, 6)), ValueError, "same shape"),
    (dict(targets=torch.zeros(4, 2, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.zeros(4)), ValueError, "integer"),
    (dict(student_logits=[[0.0]]), TypeError, "tensor"),
])
def test_bad_input(kwargs, error, match):
    call = dict(student_logits=torch.zeros(4, 5), teacher_logits=torch.zeros(4, 5),
                targets=torch.zeros(4, dtype=torch.long), temperature=2.0, alpha=0.5)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        kd_loss(**call)
    with pytest.raises(TypeError, match="teacher"):
        distillation_loss("smollm2")


def test_checker_passes_a_copy_and_refuses_the_library_and_kl_div():
    assert check_kd_loss(source_copy(module, "_check_kd_args", "kd_loss")[1])
    assert refused(check_kd_loss(kd_loss), "kd_loss itself")
    assert refused(check_kd_loss(lambda s, t, y, T, a: kd_loss(s, t, y, T, a)), "course_lib.training.distill.kd_loss")

    def with_kl_div(s, t, y, T, a):
        return _reference(s, t, y, T, a)
    assert refused(check_kd_loss(with_kl_div), "kl_div")

    def with_module(s, t, y, T, a):
        c, v = y != -100, s.shape[-1]
        kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(F.log_softmax(s[c] / T, -1),
                                                                         F.log_softmax(t[c] / T, -1))
        return a * T * T * kl + (1 - a) * F.cross_entropy(s.reshape(-1, v), y.reshape(-1))
    assert refused(check_kd_loss(with_module), "KLDivLoss")


def _manual(s, t, y, T, a, square=True, reverse=False):
    c, v = y != -100, s.shape[-1]
    lq, lp = F.log_softmax(s[c] / T, -1), F.log_softmax(t[c] / T, -1)
    if reverse:
        lp, lq = lq, lp
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return a * (T * T if square else 1) * kl + (1 - a) * F.cross_entropy(s.reshape(-1, v), y.reshape(-1))


def test_checker_names_typical_mistakes():
    assert check_kd_loss(_manual)
    result = check_kd_loss(lambda s, t, y, T, a: _manual(s, t, y, T, a, square=False))
    assert not result and "T²" in str(result)
    result = check_kd_loss(lambda s, t, y, T, a: _manual(s, t, y, T, a, reverse=True))
    assert not result and "forward KL" in str(result)
    result = check_kd_loss(lambda s, t, y, T, a: _manual(s.detach(), t, y, T, a))
    assert not result and "do not detach" in str(result)

    def ignores_nothing(s, t, y, T, a):                 # KL over every position, ignored ones too
        v = s.shape[-1]
        lq, lp = F.log_softmax(s.reshape(-1, v) / T, -1), F.log_softmax(t.reshape(-1, v) / T, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean()
        return a * T * T * kl + (1 - a) * F.cross_entropy(s.reshape(-1, v), y.reshape(-1))
    result = check_kd_loss(ignores_nothing)
    assert not result and "ignored" in str(result)
