"""course_lib.serving.speculative (chapter 11b): greedy speculative decoding gives generate_tokens' tokens on
SmolLM2 and on tiny random models (whatever the draft, so the KV-cache rollback is right); rejection sampling
gives the target's distribution, worked out exactly and measured on hand-made distributions (and wrong rules
fail the same measurement); seeds, eos, lengths, bad input; the checkers."""
import copy

import pytest
import torch

import course_lib.serving.speculative as module
from course_lib.checks.speculative import (_acceptance_reference, check_acceptance_probability,
                                           check_residual_distribution, check_verify_greedy, check_verify_sampled)
from course_lib.generation import generate_tokens
from course_lib.model import ModelArgs, Transformer
from course_lib.serving.speculative import (SpeculativeStats, expected_tokens_per_forward, layer_skip_draft,
                                            residual_distribution, speculative_generate, verify_greedy,
                                            verify_sampled)
from shortcuts import refused, source_copy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Decode steps are tiny products: on a shared 2-core machine one thread avoids OpenMP stalls."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dist(*ps) -> torch.Tensor:
    return torch.tensor(ps, dtype=torch.float32)


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    "Total-variation distance between two distributions."
    return 0.5 * float((a.double() - b.double()).abs().sum())


# ------------------------------------------------------------------ tiny random models: the loop's contract

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128, max_seq_len=64)
    return Transformer(args).eval()


@pytest.fixture(scope="module")
def tiny_other():
    "An unrelated model with the same vocabulary: a draft that is mostly rejected."
    torch.manual_seed(1)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=96, hidden_dim=64, max_seq_len=64)
    return Transformer(args).eval()


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("which", ["first layer", "all layers", "other model"])
def test_tiny_greedy_equals_generate_tokens_whatever_the_draft(tiny, tiny_other, which, k):
    draft = {"first layer": lambda: layer_skip_draft(tiny, 1), "all layers": lambda: layer_skip_draft(tiny, 4),
             "other model": lambda: tiny_other}[which]()
    for prompt in ([3, 17, 42], [5], list(range(10, 30))):
        want = list(generate_tokens(tiny, prompt, 30))
        got, stats = speculative_generate(tiny, draft, prompt, 30, k=k)
        assert got == want
        assert stats.new_tokens == 30 and stats.accepted <= stats.proposed == stats.draft_forwards
        assert stats.accepted + stats.rejected <= stats.proposed
        assert 1 <= stats.target_forwards <= 30


def test_a_draft_with_all_layers_is_always_accepted_and_forwards_are_counted(tiny):
    tokens, stats = speculative_generate(tiny, layer_skip_draft(tiny, 4), [1, 2, 3], 16, k=4)
    assert stats.accepted == stats.proposed == 12 and stats.rejected == 0
    assert stats.acceptance_rate == 1.0
    assert stats.target_forwards == 1 + 3           # the prefill (1 token), then 3 steps of 4 drafts + the bonus
    assert stats.tokens_per_target_forward == 16 / 4
    assert "16 tokens in 4 target forwards" in str(stats)
    _, stats = speculative_generate(tiny, layer_skip_draft(tiny, 4), [1, 2, 3], 17, k=4)
    assert stats.target_forwards == 5 and stats.proposed == 12   # the 17th token: a last step with no drafts


def test_max_new_tokens_is_exact_and_eos_stops(tiny, tiny_other):
    prompt = [7, 8, 9]
    plain = list(generate_tokens(tiny, prompt, 25))
    for draft in (layer_skip_draft(tiny, 4), tiny_other):
        for n in (0, 1, 2, 5, 6, 25):
            assert speculative_generate(tiny, draft, prompt, n, k=4)[0] == plain[:n]
        for eos in (plain[0], plain[3], plain[-1], 95):
            want = list(generate_tokens(tiny, prompt, 25, eos_id=eos))
            got, stats = speculative_generate(tiny, draft, prompt, 25, k=5, eos_id=eos)
            assert got == want and stats.new_tokens == len(want)
    assert speculative_generate(tiny, tiny_other, prompt, 0)[1] == SpeculativeStats()


def test_seeded_sampling_repeats_and_starts_like_generate_tokens(tiny, tiny_other):
    settings = dict(method="top_k", top_k=20, temperature=0.9)
    a = speculative_generate(tiny, tiny_other, [4, 5], 24, k=3, seed=11, **settings)[0]
    b = speculative_generate(tiny, tiny_other, [4, 5], 24, k=3, seed=11, **settings)[0]
    c = speculative_generate(tiny, tiny_other, [4, 5], 24, k=3, seed=12, **settings)[0]
    assert a == b and a != c and len(a) == 24
    assert a[0] == next(generate_tokens(tiny, [4, 5], 1, seed=11, **settings))   # the same first draw
    torch.manual_seed(5)                         # seed=None draws its seed from torch's global RNG
    d = speculative_generate(tiny, tiny_other, [4, 5], 24, k=3, **settings)[0]
    torch.manual_seed(5)
    assert speculative_generate(tiny, tiny_other, [4, 5], 24, k=3, **settings)[0] == d


def test_sampling_with_a_perfect_draft_accepts_every_token(tiny):
    _, stats = speculative_generate(tiny, layer_skip_draft(tiny, 4), [1, 2], 20, k=3, method="temperature", seed=0)
    assert stats.acceptance_rate > 0.95          # p == q up to float rounding: u·q(x) < p(x) all but always


def test_layer_skip_draft_shares_weights_not_caches(tiny):
    draft = layer_skip_draft(tiny, 2)
    assert len(draft.layers) == 2 and draft.args.n_layers == 2 and tiny.args.n_layers == 4
    ids = {id(p) for p in tiny.parameters()}
    assert all(id(p) in ids for p in draft.parameters())                 # no copies
    assert draft.output is tiny.output and draft.freqs_cis is tiny.freqs_cis
    for ours, theirs in zip(draft.layers, tiny.layers):
        assert ours.attention is not theirs.attention and ours.attention.wq is theirs.attention.wq
        assert ours.feed_forward is theirs.feed_forward
    with torch.inference_mode():
        full = tiny(torch.tensor([[1, 2, 3, 4]]))                         # (1, 4, vocab)
        draft(torch.tensor([[9, 9, 9, 9, 9, 9]]))                         # fills the draft's own caches
        again = tiny(torch.tensor([[4]]), start_pos=3)                    # reads the target's cache
    assert torch.allclose(again[0, -1], full[0, -1], atol=1e-5)          # untouched by the draft
    assert tiny.layers[0].attention.cache.length == 4 and draft.layers[0].attention.cache.length == 6
    with torch.inference_mode():
        hidden = tiny.tok_embeddings(torch.tensor([[1, 2, 3]]))
        freqs = tiny.freqs_cis[:3]
        mask = torch.full((3, 3), float("-inf")).triu(1)
        for layer in tiny.layers[:2]:
            hidden = layer(hidden, 0, freqs, mask)
        by_hand = tiny.output(tiny.norm(hidden)).float()                  # the first 2 layers, norm, output
        assert torch.allclose(draft(torch.tensor([[1, 2, 3]])), by_hand, atol=1e-5)


def test_layer_skip_draft_of_a_fused_and_a_quantized_model(tiny):
    from course_lib.fused import fuse_model
    from course_lib.quant_model import quantize_model
    fused = fuse_model(copy.deepcopy(tiny))
    quant = quantize_model(copy.deepcopy(tiny), "q8_0")
    for model in (fused, quant):
        draft = layer_skip_draft(model, 2)
        assert type(draft.layers[0].attention) is type(model.layers[0].attention)
        plain = list(generate_tokens(model, [1, 2, 3], 12))
        assert speculative_generate(model, draft, [1, 2, 3], 12, k=3)[0] == plain


# ------------------------------------------------------------------ SmolLM2

PROMPTS = [[504, 3575, 282, 4649, 314],                     # "The capital of France is"
           [1604, 3987, 46477, 24, 94, 727]]                # "def fibonacci(n):"


@pytest.fixture(scope="module")
def smollm2():
    from course_lib.weights import fetch_smollm2, load_gguf_model
    return load_gguf_model(fetch_smollm2(progress=False), max_seq_len=64)


@pytest.fixture(scope="module")
def smollm2_drafts(smollm2):
    from course_lib.quant_model import quantize_model
    return {"layer skip 24": layer_skip_draft(smollm2, 24), "q4_0": quantize_model(copy.deepcopy(smollm2), "q4_0")}


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2):
    return [list(generate_tokens(smollm2, p, 16)) for p in PROMPTS]


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft", ["layer skip 24", "q4_0"])
def test_smollm2_greedy_equals_generate_tokens(smollm2, smollm2_drafts, smollm2_greedy, draft, k):
    for prompt, want in zip(PROMPTS, smollm2_greedy):
        got, stats = speculative_generate(smollm2, smollm2_drafts[draft], prompt, 16, k=k)
        assert got == want, (draft, k, prompt)
        assert stats.accepted > 0                  # both drafts are right some of the time


@pytest.mark.slow
def test_smollm2_eos_and_lengths(smollm2, smollm2_drafts, smollm2_greedy):
    draft, want = smollm2_drafts["q4_0"], smollm2_greedy[0]
    assert speculative_generate(smollm2, draft, PROMPTS[0], 0)[0] == []
    assert speculative_generate(smollm2, draft, PROMPTS[0], 1, k=5)[0] == want[:1]
    eos = want[4]
    got = speculative_generate(smollm2, draft, PROMPTS[0], 16, k=5, eos_id=eos)[0]
    assert got == list(generate_tokens(smollm2, PROMPTS[0], 16, eos_id=eos)) and got[-1] == eos


# ------------------------------------------------------------------ verification on hand-made distributions

def test_verify_greedy():
    assert verify_greedy([5, 7, 9, 2], [5, 7, 9]) == [5, 7, 9, 2]
    assert verify_greedy([4, 7, 9, 2], [5, 7, 9]) == [4]
    assert verify_greedy([5, 1, 9, 2], [5, 7, 9]) == [5, 1]
    assert verify_greedy(torch.tensor([3]), []) == [3]
    with pytest.raises(ValueError, match="one token more"):
        verify_greedy([1, 2], [1, 2])


def test_residual_distribution():
    p, q = dist(0.5, 0.25, 0.25, 0), dist(0.25, 0.5, 0, 0.25)
    assert torch.equal(residual_distribution(p, q), dist(0.5, 0, 0.5, 0))
    assert torch.equal(residual_distribution(p, p), p)                   # no excess anywhere: p itself
    batch = residual_distribution(torch.stack([p, q]), torch.stack([q, p]))
    assert torch.equal(batch, torch.stack([dist(0.5, 0, 0.5, 0), dist(0, 0.5, 0, 0.5)]))


def exact_output(p: torch.Tensor, q: torch.Tensor, accept_rule, replacement) -> torch.Tensor:
    "The distribution of one verified draft x ~ q: sum over x of q(x)·[accept(x)·δ_x + (1 - accept(x))·replacement]."
    out = torch.zeros_like(p, dtype=torch.float64)
    for x in range(len(p)):
        a = accept_rule(p, q, x)
        out[x] += q[x] * a
        out += q[x] * (1 - a) * replacement(p, q).double()
    return out


def leviathan(p, q, x):
    return min(1.0, float(p[x] / q[x])) if q[x] > 0 else 1.0


HAND_MADE = [(dist(0.1, 0.2, 0.3, 0.4), dist(0.4, 0.3, 0.2, 0.1)),
             (dist(0.7, 0.1, 0.1, 0.1, 0.0), dist(0.05, 0.05, 0.1, 0.4, 0.4)),
             (torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), -1),
              torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(1)) * 2, -1))]


@pytest.mark.parametrize("p, q", HAND_MADE)
def test_the_rule_gives_p_exactly(p, q):
    assert torch.allclose(exact_output(p, q, leviathan, residual_distribution), p.double(), atol=1e-6)
    # the wrong rules do not: accepting every draft gives q, a replacement from p keeps part of q's taste
    assert tv(exact_output(p, q, lambda p, q, x: 1.0, residual_distribution), p) > 0.1
    assert tv(exact_output(p, q, leviathan, lambda p, q: p), p) > 0.05


def output_frequencies(verify, p: torch.Tensor, q: torch.Tensor, k: int, n_tokens: int, seed: int = 0):
    """Run `verify` on drafts drawn from q until n_tokens came out. The frequencies of every output token, of the
    first token of each call and of the second (where there is one). The model is context-free (the same p and
    q at every position), so the stream of output tokens should be i.i.d. samples of p: each judgement uses a
    fresh draft and a fresh uniform, and the bonus token comes from p."""
    g = torch.Generator().manual_seed(seed)
    pk, qk = torch.stack([p] * (k + 1)), torch.stack([q] * k)
    drafts = torch.multinomial(q, n_tokens * k, replacement=True, generator=g).view(n_tokens, k).tolist()
    counts = [[0] * len(p) for _ in range(3)]                              # all, first, second
    total = 0
    for row in drafts:
        out = verify(pk, qk, row, g)
        for t in out:
            counts[0][t] += 1
        counts[1][out[0]] += 1
        if len(out) > 1:
            counts[2][out[1]] += 1
        total += len(out)
        if total >= n_tokens:
            break
    freq = torch.tensor(counts, dtype=torch.float64)
    return freq / freq.sum(-1, keepdim=True), total


def always_accept(p, q, drafts, g):
    return list(drafts) + [int(torch.multinomial(p[-1], 1, generator=g))]


def replacement_from_p(p, q, drafts, g):
    out = []
    for i, x in enumerate(drafts):
        if torch.rand((), generator=g, dtype=torch.float64) * q[i, x] < p[i, x]:
            out.append(x)
            continue
        return out + [int(torch.multinomial(p[i], 1, generator=g))]
    return out + [int(torch.multinomial(p[-1], 1, generator=g))]


# 200,000 output tokens: the noise in the total-variation distance from p is about 0.002 (0.003 for the ~90,000
# first tokens); the wrong rules sit at 0.1 to 0.4
BOUND = 0.01


@pytest.mark.slow
def test_verify_sampled_output_follows_p_over_200k_tokens():
    p, q = HAND_MADE[0]
    (every, first, second), total = output_frequencies(verify_sampled, p, q, k=3, n_tokens=200_000)
    assert total >= 200_000
    assert tv(every, p) < BOUND and tv(first, p) < BOUND and tv(second, p) < 1.5 * BOUND, (every, first, second)


@pytest.mark.parametrize("wrong", [always_accept, replacement_from_p])
def test_wrong_rules_fail_the_same_measurement(wrong):
    p, q = HAND_MADE[0]
    (every, first, _), _ = output_frequencies(wrong, p, q, k=3, n_tokens=20_000)   # far beyond the bound already
    assert tv(every, p) > 5 * BOUND and tv(first, p) > 10 * BOUND, (every, first)


def test_verify_sampled_keeps_p_where_the_draft_never_proposes_a_token():
    p, q = HAND_MADE[1]                                                    # p puts 0.7 on a token q rarely draws
    (every, first, _), _ = output_frequencies(verify_sampled, p, q, k=2, n_tokens=20_000, seed=1)
    assert tv(every, p) < 0.02 and tv(first, p) < 0.02, (every, first)


def test_verify_sampled_structure():
    g = torch.Generator().manual_seed(0)
    one = dist(0.5, 0.5, 0, 0)
    bonus = dist(0, 0, 0, 1)
    for _ in range(10):
        assert verify_sampled(torch.stack([one, one, bonus]), torch.stack([one, one]), [0, 1], g) == [0, 1, 3]
        assert verify_sampled(torch.stack([dist(0.5, 0.5, 0), dist(1, 0, 0)]), dist(0, 0.5, 0.5)[None], [2], g) == [0]
    assert verify_sampled(bonus[None], torch.zeros(0, 4), [], g) == [3]                   # k = 0: the bonus only


def test_expected_tokens_per_forward():
    assert expected_tokens_per_forward(0.0, 4) == 1.0
    assert expected_tokens_per_forward(1.0, 4) == 5.0
    assert abs(expected_tokens_per_forward(0.5, 2) - 1.75) < 1e-12
    with pytest.raises(ValueError, match="acceptance_rate"):
        expected_tokens_per_forward(1.5, 2)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("change, error, match", [
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=62), ValueError, "draft's max_seq_len=40"),
    (dict(prompt_ids=[]), ValueError, "prompt_ids is empty"),
    (dict(prompt_ids=[1, 96]), ValueError, "outside the vocabulary"),
    (dict(prompt_ids="hello"), TypeError, "prompt_ids"),
    (dict(method="beam"), ValueError, "method must be one of"),
    (dict(method="top_p"), ValueError, "needs top_p"),
    (dict(top_k=5), ValueError, "not used by method='greedy'"),
    (dict(eos_id=96), ValueError, "eos_id=96"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(target="model"), TypeError, "target: "),
    (dict(draft=None), TypeError, "draft: "),
])
def test_bad_inputs(tiny, change, error, match):
    torch.manual_seed(2)
    short = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=96, hidden_dim=64, max_seq_len=40)).eval()
    args = dict(target=tiny, draft=short, prompt_ids=[1, 2], max_new_tokens=4) | change
    with pytest.raises(error, match=match):
        speculative_generate(**args)


def test_bad_models(tiny):
    with pytest.raises(ValueError, match="draft is the target itself"):
        speculative_generate(tiny, tiny, [1], 3)
    sharing = layer_skip_draft(tiny, 2)
    sharing.layers[0].attention = tiny.layers[0].attention                 # one KV cache for two models
    with pytest.raises(ValueError, match="shares Attention modules"):
        speculative_generate(tiny, sharing, [1], 3)
    other_vocab = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=97, hidden_dim=64, max_seq_len=64))
    with pytest.raises(ValueError, match="vocab_size=96 \\(target\\) and 97 \\(draft\\)"):
        speculative_generate(tiny, other_vocab, [1], 3)
    for n_layers, error in ((0, ValueError), (5, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match="n_layers"):
            layer_skip_draft(tiny, n_layers)
    with pytest.raises(TypeError, match="Transformer"):
        layer_skip_draft("model", 1)


def test_bad_distributions():
    p = dist(0.5, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        residual_distribution(p, dist(0.25, 0.25, 0.5))
    with pytest.raises(ValueError, match="sum to 1"):
        residual_distribution(dist(0.5, 0.6), p)
    with pytest.raises(ValueError, match="must be \\(3, vocab\\)"):
        verify_sampled(torch.stack([p, p]), torch.stack([p, p]), [0, 1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify_sampled(torch.stack([p, p]), p[None], [2])


# ------------------------------------------------------------------ checkers

def test_checkers_pass_copies_of_the_reference():
    greedy, residual, sampled = source_copy(module, "_check_pair", "_check_verify_inputs", "_residual", "verify_greedy",
                                            "residual_distribution", "verify_sampled")[3:]
    assert check_verify_greedy(greedy)
    assert check_residual_distribution(residual)
    assert check_verify_sampled(sampled)
    assert check_acceptance_probability(lambda p, q: p.minimum(q).sum(-1))     # written another way


def test_checkers_refuse_the_library():
    for name, check in (("verify_greedy", check_verify_greedy), ("residual_distribution", check_residual_distribution),
                        ("verify_sampled", check_verify_sampled)):
        answer = getattr(module, name)
        assert refused(check(answer), f"course_lib.serving.speculative.{name} itself")
        assert refused(check(lambda *args, _f=answer: _f(*args)), f"course_lib.serving.speculative.{name}")
    assert refused(check_acceptance_probability(_acceptance_reference), "_acceptance_reference")
    # built on the library's helpers: refused too
    def on_library_residual(p, q, drafts, g):
        return [int(torch.multinomial(module._residual(p[0], q[0]), 1, generator=g))]
    assert refused(check_verify_sampled(on_library_residual), "course_lib.serving.speculative._residual")
    assert refused(check_residual_distribution(lambda p, q: module._residual(p, q)), "speculative._residual")


def test_checkers_reject_typical_mistakes():
    assert not check_verify_greedy(lambda a, d: [int(x) for x in d] + [int(a[-1])])           # accepts everything
    assert not check_verify_greedy(lambda a, d: [int(x) for x in d if x in list(a)] + [int(a[-1])])
    no_bonus = check_verify_greedy(lambda a, d: next(([int(x) for x in d[:i]] + [int(a[i])]
                                                      for i in range(len(d)) if int(a[i]) != d[i]), list(d)))
    assert not no_bonus and "expected [5, 7, 9, 2]" in str(no_bonus)
    unnormalized = check_residual_distribution(lambda p, q: torch.clamp(p - q, min=0))
    assert not unnormalized and "does not divide by the sum" in str(unnormalized)
    flipped = check_residual_distribution(lambda p, q: (q - p).clamp(min=0) / (q - p).clamp(min=0).sum(-1, keepdim=True))
    assert not flipped and "max(0, q - p)" in str(flipped)
    assert not check_verify_sampled(always_accept)
    from_p = check_verify_sampled(replacement_from_p)
    assert not from_p and "is 0 every time" in str(from_p)
    product = check_acceptance_probability(lambda p, q: (p * q).sum(-1))
    assert not product and "sums p·q" in str(product)
    assert not check_acceptance_probability(lambda p, q: 1 - (p - q).abs().sum(-1))
