"""Chapter 13: the training primitives against PyTorch's own (cross-entropy, AdamW, clipping) and transformers'
schedule, the data windows, the loop (the loss falls; checkpoints; exact resumption), the CLI, and the checkers."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import course_lib.checks.training as checks
import course_lib.training.losses as losses
import course_lib.training.optim as optim
from course_lib import ModelArgs, Transformer, load_meta_checkpoint
from course_lib.cli import main
from course_lib.training import (AdamW, TokenData, bits_per_character, clip_grad_norm, cosine_schedule, cross_entropy,
                                 evaluate_loss, init_weights, load_checkpoint, log_softmax, text_data, train)
from shortcuts import refused, source_copy

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=48, max_seq_len=32)


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return init_weights(Transformer(ModelArgs(**{**TINY, **kw})), seed=seed)


def _data(n=4000, vocab=48, seed=0) -> TokenData:
    "A learnable stream: a noisy repeating pattern, so the loss has somewhere to fall."
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, vocab, (37,), generator=g)
    ids = pattern.repeat(n // 37 + 1)[:n]
    noise = torch.rand(n, generator=g) < 0.1
    ids[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return TokenData.split(ids, 0.2)


# --- cross-entropy --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,vocab,ignored,ignore_index", [((7,), 5, 0.0, -100), ((3, 9), 50257, 0.3, -100),
                                                               ((2, 4, 6), 11, 0.5, 3), ((5,), 2, 0.0, -1)])
def test_cross_entropy_equals_pytorch_with_its_gradient(shape, vocab, ignored, ignore_index):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(*shape, vocab, generator=g) * 4).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignored] = ignore_index
    ours = cross_entropy(logits, targets, ignore_index)
    ref = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=ignore_index)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6) and ours.dtype == torch.float32
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, logits), torch.autograd.grad(ref, logits)
    assert torch.allclose(g_ours, g_ref, rtol=1e-5, atol=1e-10)


def test_cross_entropy_edge_cases():
    logits = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert cross_entropy(logits, torch.tensor([2])).item() == F.cross_entropy(logits, torch.tensor([2])).item() == 2000.0
    assert torch.isnan(cross_entropy(torch.randn(2, 3, 5), torch.full((2, 3), -100)))      # 0/0, as PyTorch
    x = torch.randn(4, 7, dtype=torch.float64)
    t = torch.randint(0, 7, (4,))
    assert cross_entropy(x, t).dtype == torch.float64 and torch.allclose(cross_entropy(x, t), F.cross_entropy(x, t))
    xb = torch.randn(4, 7).bfloat16()
    assert cross_entropy(xb, t).dtype == torch.float32
    assert torch.allclose(cross_entropy(xb, t), F.cross_entropy(xb.float(), t))
    assert torch.allclose(log_softmax(torch.tensor([0.0, float("-inf")])), torch.tensor([0.0, float("-inf")]))
    assert torch.allclose(log_softmax(x, 0), torch.log_softmax(x, 0))


def test_cross_entropy_refuses_bad_input_naming_it():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        cross_entropy(logits, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        cross_entropy(torch.ones(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape without its last dimension, \(2, 3\); got \(3, 2\)"):
        cross_entropy(logits, torch.zeros(3, 2, dtype=torch.long))
    bad = torch.zeros(2, 3, dtype=torch.long)
    bad[1, 2] = 5
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 5 is not a token id \(0..4\)"):
        cross_entropy(logits, bad)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), ignore_index=None)


# --- AdamW, the schedule, clipping ----------------------------------------------------------------------------

def _run(make_optimizer, steps=40, closure=False):
    model = _model(1, tie_embeddings=True)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": 1e-3}]
    opt = make_optimizer(groups)
    data = _data()
    for step in range(steps):
        x, y = data.batch("train", step, 4, 16)
        if closure:
            def f():
                opt.zero_grad()
                loss = cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(f)
        else:
            loss = cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, opt


@pytest.mark.parametrize("foreach", [False, None])
def test_adamw_takes_torch_optim_adamws_steps_bit_for_bit(foreach):
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ours, o1 = _run(lambda g: AdamW(g, **hp))
    ref, o2 = _run(lambda g: torch.optim.AdamW(g, foreach=foreach, **hp))
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    s1, s2 = o1.state_dict(), o2.state_dict()
    for k in s1["state"]:
        assert all(torch.equal(s1["state"][k][n], s2["state"][k][n]) for n in ("step", "exp_avg", "exp_avg_sq"))
    assert _run(lambda g: AdamW(g, **hp), closure=True)[0].state_dict().keys() == ours.state_dict().keys()


def test_adamw_loads_torch_optim_adamws_state_and_continues_identically():
    hp = dict(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.05)
    model_a, opt_ref = _run(lambda g: torch.optim.AdamW(g, foreach=False, **hp), steps=5)
    model_b = _model(1, tie_embeddings=True)
    model_b.load_state_dict(model_a.state_dict())
    params_b = [{"params": [p for p in model_b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in model_b.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": 1e-3}]
    ours = AdamW(params_b, **hp)
    ours.load_state_dict(copy.deepcopy(opt_ref.state_dict()))   # its tensors, not shared with the reference
    x = torch.randint(0, 48, (2, 9))
    for model, opt in ((model_a, opt_ref), (model_b, ours)):
        opt.zero_grad()
        cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_adamw_skips_parameters_without_gradients_and_refuses_bad_settings():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamW([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and not torch.equal(a, torch.ones(3)) and b not in opt.state
    for bad in (dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=float("nan")), dict(weight_decay=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdamW([a], **bad)


def test_cosine_schedule_equals_transformers():
    transformers = pytest.importorskip("transformers")
    for warmup, total, min_lr in ((0, 50, 0.0), (10, 100, 1e-4), (25, 60, 5e-4)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
        if min_lr:
            sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr=min_lr)
        else:
            sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
        for step in range(total + 1):
            assert math.isclose(cosine_schedule(step, 1e-3, warmup, total, min_lr), opt.param_groups[0]["lr"],
                                rel_tol=1e-12, abs_tol=1e-18), (warmup, total, step)
            opt.step()
            sched.step()
    assert cosine_schedule(500, 1e-3, 10, 100, 1e-4) == 1e-4                   # stays at min_lr after the end
    for bad, match in (((-1, 1e-3, 1, 10), "step"), ((0, 1e-3, 11, 10), "warmup_steps=11 is more"),
                       ((0, -1e-3, 1, 10), "max_lr"), ((0, 1e-3, 1, 10, 2e-3), "min_lr=0.002 is more")):
        with pytest.raises(ValueError, match=match):
            cosine_schedule(*bad)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_grad_norm_equals_pytorchs(max_norm):
    def grads():
        model = _model(2)
        x = torch.randint(0, 48, (2, 12))
        cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
        return list(model.parameters())
    a, b = grads(), grads()
    norm_a, norm_b = clip_grad_norm(a, max_norm), torch.nn.utils.clip_grad_norm_(b, max_norm)
    assert torch.allclose(norm_a, norm_b, rtol=1e-6)
    assert all(torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0) for p, q in zip(a, b))
    total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a]))
    assert total <= max_norm * (1 + 1e-5) if max_norm < 1 else torch.allclose(total, norm_a)
    assert clip_grad_norm([torch.nn.Parameter(torch.ones(2))], 1.0).item() == 0.0     # no gradients at all
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(a, 0)


# --- data ------------------------------------------------------------------------------------------------------

def test_token_data_windows():
    data = TokenData.split(torch.arange(1000) % 97, 0.1)
    assert (len(data.train), len(data.val)) == (900, 100) and torch.equal(data.val, torch.arange(900, 1000) % 97)
    x, y = data.batch("train", 3, 8, 16, seed=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, data.batch("train", 3, 8, 16, seed=1)[0])                    # a function of (seed, step)
    assert not torch.equal(x, data.batch("train", 4, 8, 16, seed=1)[0])
    assert not torch.equal(x, data.batch("train", 3, 8, 16, seed=2)[0])
    starts = torch.cat([data.batch("train", s, 64, 16)[0][:, 0] for s in range(50)])
    assert int(starts.max()) == 96 or int(starts.max()) >= 80                           # windows reach the end
    batches = data.eval_batches("val", 3, 2, 10)
    assert len(batches) == 3 and batches[0][0][0, 0] == 900 % 97 and batches[-1][1][-1, -1] == 999 % 97


def test_token_data_refuses_bad_input():
    with pytest.raises(TypeError, match="1-D integer tensor"):
        TokenData(torch.zeros(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="negative token id"):
        TokenData.split([1, 2, -3, 4])
    data = TokenData.split(torch.arange(100), 0.1)
    with pytest.raises(ValueError, match="the val split has 10 tokens, fewer than seq_len \\+ 1 = 11"):
        data.batch("val", 0, 1, 10)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        data.batch("test", 0, 1, 4)
    with pytest.raises(ValueError, match="val_fraction"):
        TokenData.split(torch.arange(100), 1.0)


def test_text_data_with_both_tokenizer_kinds(tmp_path):
    from course_lib import BPE
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be " * 50)
    data = text_data(path, BPE.train(path.read_text(), 260))
    assert len(data.train) + len(data.val) == len(BPE.train(path.read_text(), 260).encode(path.read_text()))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        text_data(tmp_path / "empty.txt", BPE())
    with pytest.raises(FileNotFoundError):
        text_data(tmp_path / "missing.txt", BPE())


# --- the loop ------------------------------------------------------------------------------------------------

def test_training_lowers_the_validation_loss_and_logs_it():
    model, data = _model(3), _data()
    before = evaluate_loss(model, data, n_batches=4, batch_size=8, seq_len=16)
    assert abs(before - math.log(48)) < 0.2                                             # GPT-2 init: about log V
    log = train(model, data, 60, batch_size=8, seq_len=16, lr=1e-2, eval_every=20, eval_batches=4, progress=False)
    assert log.steps == list(range(60)) and log.val_steps == [20, 40, 60] and len(log.grad_norm) == 60
    assert log.val_loss[-1] < before - 1.5 and log.val_loss == sorted(log.val_loss, reverse=True)
    assert log.tokens == 60 * 8 * 16 and log.tokens_per_second > 0
    assert log.lr[0] == 0.0 and max(log.lr) == pytest.approx(1e-2) and log.lr[-1] == pytest.approx(1e-3, rel=0.01)


def test_two_backward_passes_through_the_kv_cache():
    model = _model(4)                                   # chapter 04's cache is written under autograd: no stale graph
    x = torch.randint(0, 48, (2, 10))
    for _ in range(2):
        cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_resumed_run_continues_bit_for_bit_and_loads_in_chapter_07(tmp_path):
    kw = dict(batch_size=4, seq_len=16, lr=5e-3, eval_every=5, eval_batches=2, seed=7, progress=False)
    straight = _model(5, tie_embeddings=True)
    log_straight = train(straight, _data(), 20, **kw)
    train(_model(5, tie_embeddings=True), _data(), 20, stop_at=8, checkpoint_dir=tmp_path / "ck", **kw)
    (tmp_path / "ck" / "tokenizer.model").write_bytes(b"kept")                          # a file of the run's own
    resumed = _model(99, tie_embeddings=True)                                           # other weights: all loaded
    log = train(resumed, _data(), 20, stop_at=14, resume_from=tmp_path / "ck", checkpoint_dir=tmp_path / "ck", **kw)
    assert log.steps == list(range(14))
    resumed = _model(98, tie_embeddings=True)
    log = train(resumed, _data(), 20, resume_from=tmp_path / "ck", checkpoint_dir=tmp_path / "ck", **kw)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert log.train_loss == log_straight.train_loss and log.val_loss == log_straight.val_loss
    assert log.grad_norm == log_straight.grad_norm and log.lr == log_straight.lr
    assert (tmp_path / "ck" / "tokenizer.model").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]                          # no temporary folders left
    assert resumed.output.weight is resumed.tok_embeddings.weight                       # still tied
    reloaded = load_meta_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 48, (1, 12))
    assert torch.equal(reloaded(x), resumed(x))
    step, _, config = load_checkpoint(tmp_path / "ck", _model(0, tie_embeddings=True))
    assert step == 20 and config["seed"] == 7


def test_resume_and_checkpoint_mistakes_are_refused(tmp_path):
    kw = dict(batch_size=4, seq_len=16, progress=False)
    train(_model(), _data(), 6, stop_at=3, checkpoint_dir=tmp_path / "ck", **kw)
    with pytest.raises(ValueError, match="already holds a training checkpoint"):
        train(_model(), _data(), 6, checkpoint_dir=tmp_path / "ck", **kw)
    with pytest.raises(ValueError, match=r"other settings.*'lr': \(0.001, 0.01\)"):
        train(_model(), _data(), 6, lr=1e-2, resume_from=tmp_path / "ck", **kw)
    with pytest.raises(ValueError, match="holds a different model"):
        train(_model(dim=64), _data(), 6, resume_from=tmp_path / "ck", **kw)
    with pytest.raises(ValueError, match="nothing to do before step 3"):
        train(_model(), _data(), 6, stop_at=3, resume_from=tmp_path / "ck", **kw)
    (tmp_path / "ck" / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a training state"):
        train(_model(), _data(), 6, resume_from=tmp_path / "ck", **kw)
    with pytest.raises(FileNotFoundError, match="training_state.pt"):
        load_checkpoint(tmp_path / "nowhere", _model())


def test_train_refuses_bad_arguments():
    model, data = _model(), _data()
    for kw, match in ((dict(steps=0), "steps must be an int >= 1"), (dict(seq_len=64), "longer than the model's max_seq_len=32"),
                      (dict(stop_at=20), "stop_at=20 is after the last step"), (dict(warmup_steps=50), "warmup_steps=50"),
                      (dict(eval_every=0), "eval_every")):
        args = dict(steps=10, seq_len=16, progress=False)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            train(model, data, **args)
    with pytest.raises(TypeError, match="data must be a TokenData"):
        train(model, torch.arange(100), 10)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, data, 10, seq_len=16)


def test_frozen_parameters_stay_and_a_custom_loss_is_used():
    model, data = _model(6), _data()
    model.tok_embeddings.weight.requires_grad_(False)
    frozen = model.tok_embeddings.weight.clone()
    calls = []

    def loss_fn(m, x, y):
        calls.append(x.shape)
        return cross_entropy(m(x), y) * 0.5
    log = train(model, data, 4, batch_size=2, seq_len=8, loss_fn=loss_fn, eval_every=4, eval_batches=2, progress=False)
    assert torch.equal(model.tok_embeddings.weight, frozen) and calls == [(2, 8)] * 4
    assert log.val_loss == [evaluate_loss(model, data, n_batches=2, batch_size=2, seq_len=8)]   # cross-entropy, not loss_fn


def test_init_weights_and_bits_per_character():
    model = init_weights(Transformer(ModelArgs(dim=256, n_layers=8, n_heads=4, vocab_size=512, max_seq_len=8)), seed=0)
    assert abs(model.layers[0].attention.wq.weight.std().item() - 0.02) < 1e-3
    assert abs(model.layers[0].attention.wo.weight.std().item() - 0.02 / 4) < 1e-3      # / sqrt(2 * 8 layers)
    assert abs(model.layers[3].feed_forward.w2.weight.std().item() - 0.02 / 4) < 1e-3
    assert torch.equal(model.norm.weight, torch.ones(256))
    assert bits_per_character(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bits_per_character(2.0, 100, 230) == pytest.approx(2.0 * 100 / 230 / math.log(2))
    with pytest.raises(ValueError, match="n_chars"):
        bits_per_character(1.0, 10, 0)


def test_the_train_command(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"LINE {i % 7}: the quick brown fox jumps over the lazy dog.\n" for i in range(600)))
    common = ["train", "--data", str(text), "--out", str(tmp_path / "run"), "--steps", "12", "--dim", "32",
              "--n-layers", "1", "--hidden-dim", "64", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300",
              "--eval-every", "4", "--sample-tokens", "5", "--no-progress"]
    assert main(common + ["--stop-at", "6"]) == 0
    out = capsys.readouterr().out
    assert "step 6 of 12: validation loss" in out and "bits per character" in out
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert params["dim"] == 32 and params["vocab_size"] == 300
    assert main(common) == 1 and "already holds a training run" in capsys.readouterr().err
    assert main(common + ["--resume"]) == 0 and "step 12 of 12" in capsys.readouterr().out
    assert main(common[:4] + [str(tmp_path / "other"), "--resume"]) == 1
    assert "holds no run to resume" in capsys.readouterr().err


# --- checkers ---------------------------------------------------------------------------------------------------

def test_checkers_pass_copies_of_the_reference_and_the_appendix_answer():
    ls, ce = source_copy(losses, "log_softmax", "_check_loss_inputs", "cross_entropy")[0::2]
    assert checks.check_log_softmax(ls) and checks.check_cross_entropy(ce)
    assert checks.check_adamw_step(source_copy(optim, "adamw_step"))
    assert checks.check_cosine_schedule(source_copy(optim, "_check_schedule", "cosine_schedule")[1])

    def grad(logits, targets, ignore_index=-100):      # written differently from the notebook's appendix
        p = torch.softmax(logits.float(), -1)
        keep = (targets != ignore_index).float()
        onehot = F.one_hot(targets.clamp(min=0) * (targets != ignore_index), logits.shape[-1]).float()
        return (p - onehot) * keep[..., None] / keep.sum()
    assert checks.check_cross_entropy_grad(grad)


def test_checkers_refuse_the_library_and_pytorchs_answers():
    assert refused(checks.check_log_softmax(lambda x, d: torch.log_softmax(x, d)), "torch.log_softmax")
    assert refused(checks.check_log_softmax(lambda x, d: x - x.logsumexp(d, keepdim=True)), "logsumexp")
    assert refused(checks.check_cross_entropy(cross_entropy), "cross_entropy itself")
    assert refused(checks.check_cross_entropy(lambda l, t, i: F.cross_entropy(l.flatten(0, -2), t.flatten(), ignore_index=i)),
                   "torch.nn.functional.cross_entropy")
    assert refused(checks.check_adamw_step(optim.adamw_step), "adamw_step itself")

    def via_torch(param, grad, m, v, step, lr, betas, eps, wd):
        opt = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=wd)
        param.grad = grad
        opt.step()
    assert refused(checks.check_adamw_step(via_torch), "torch.optim")
    assert refused(checks.check_cosine_schedule(lambda *a: cosine_schedule(*a)), "cosine_schedule")

    def via_autograd(logits, targets, ignore_index=-100):
        x = logits.clone().requires_grad_()
        (g,) = torch.autograd.grad(torch.softmax(x, -1).log().gather(-1, targets[..., None]).mean().neg(), x)
        return g
    assert refused(checks.check_cross_entropy_grad(via_autograd), "torch.autograd.grad")


def test_checkers_catch_typical_mistakes():
    def naive_log_softmax(x, dim=-1):
        return x - x.exp().sum(dim, keepdim=True).log()
    assert "subtract the row's maximum" in str(checks.check_log_softmax(naive_log_softmax))

    def mean_over_all(logits, targets, ignore_index=-100):     # ignored positions still counted in N
        logp = logits.float() - logits.float().amax(-1, keepdim=True)
        logp = logp - logp.exp().sum(-1, keepdim=True).log()
        keep = targets != ignore_index
        nll = -logp.gather(-1, torch.where(keep, targets, 0)[..., None])[..., 0]
        return (nll * keep).sum() / keep.numel()
    assert "ignored positions count in neither" in str(checks.check_cross_entropy(mean_over_all))

    def coupled_decay(p, g, m, v, step, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.01):   # Adam's L2, not AdamW
        g = g + wd * p
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        p.sub_(lr / (1 - betas[0] ** step) * m / ((v / (1 - betas[1] ** step)).sqrt() + eps))
    assert "decoupled" in str(checks.check_adamw_step(coupled_decay))

    def eps_inside(p, g, m, v, step, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.01):
        p.mul_(1 - lr * wd)
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        p.sub_(lr / (1 - betas[0] ** step) * m / (v / (1 - betas[1] ** step) + eps).sqrt())
    result = str(checks.check_adamw_step(eps_inside))
    assert "eps is added to sqrt" in result and "passed" not in result

    def rises_again(step, max_lr, warmup, total, min_lr=0.0):
        if step < warmup:
            return max_lr * step / warmup
        return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    assert "stays at min_lr" in str(checks.check_cosine_schedule(rises_again))

    def not_averaged(logits, targets, ignore_index=-100):
        p = torch.softmax(logits.float(), -1)
        keep = targets != ignore_index
        onehot = F.one_hot(torch.where(keep, targets, 0), logits.shape[-1]).float()
        return (p - onehot) * keep[..., None]
    assert "divide by N" in str(checks.check_cross_entropy_grad(not_averaged))


def test_batches_are_the_same_in_another_process():
    "The windows of a step depend on (seed, step) only: not on the process (str hashes are salted per process)."
    import subprocess
    import sys
    code = ("import torch; from course_lib.training import TokenData; "
            "d = TokenData.split(torch.arange(5000) % 251); print(d.batch('train', 7, 4, 8, seed=3)[0].tolist())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    here = TokenData.split(torch.arange(5000) % 251).batch("train", 7, 4, 8, seed=3)[0].tolist()
    assert runs == {f"{here}\n"}
