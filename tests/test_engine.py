"""Chapter 11, the paged KV cache and the Engine: under random arrivals, chunked prefill and preemption, every
request's tokens equal its prompt decoded alone (greedy, and seeded sampling in float64)."""
import random

import pytest
import torch

from course_lib import PRESETS, Transformer, fetch_smollm2, generate_tokens, load_gguf_model, read_gguf, GGUFTokenizer
from course_lib import check
from course_lib.serving import Engine, PagedKVCache, build_step, paged_cache
from course_lib.serving.paged_cache import slot_indices
from shortcuts import refused, source_copy


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny"]).double().eval()      # float64: batched and alone agree to ~1e-15


def make_requests(seed, n=10, vocab=256):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for _ in range(n)]
    return prompts, [rng.randrange(1, 20) for _ in prompts]


def serve(engine, prompts, n_new, order_seed, **kw):
    "Add the requests in a random order at random steps; step until done. Returns outputs in prompt order."
    rng, order, ids = random.Random(order_seed), list(range(len(prompts))), {}
    rng.shuffle(order)
    while order or engine.has_unfinished_requests():
        if order and rng.random() < 0.5:
            i = order.pop()
            ids[i] = engine.add_request(prompts[i], n_new[i], **kw)
        engine.step()
        assert 0 <= engine.pages_in_use <= engine.cache.n_pages
    assert engine.pages_in_use == 0                          # every finished request gave its pages back
    return [engine.output(ids[i]) for i in range(len(prompts))], engine


@pytest.mark.parametrize("page_size, n_pages, max_batch_size, max_step_tokens", [
    (16, None, 8, 256),      # room for all: plain continuous batching
    (4, 15, 3, 16),          # a small pool: preemption; chunked prefill
    (8, 8, 8, 7),            # budget below most prompts: every prompt is prefilled in chunks
    (1, 60, 8, 5),           # one position per page
])
def test_random_arrivals_equal_each_request_alone(tiny, page_size, n_pages, max_batch_size, max_step_tokens):
    prompts, n_new = make_requests(seed=page_size)
    want = [list(generate_tokens(tiny, p, n)) for p, n in zip(prompts, n_new)]
    engine = Engine(tiny, max_batch_size=max_batch_size, page_size=page_size, n_pages=n_pages,
                    max_step_tokens=max_step_tokens)
    got, engine = serve(engine, prompts, n_new, order_seed=page_size)
    assert got == want
    if n_pages == 15:
        assert sum(r.preemptions for r in engine.requests.values()) > 0   # the case is about preemption


def test_seeded_sampling_equals_generate_tokens(tiny):
    prompts, n_new = make_requests(seed=5, n=6)
    kw = dict(method="top_k", top_k=20, temperature=0.9, seed=3)
    want = [list(generate_tokens(tiny, p, n, **kw)) for p, n in zip(prompts, n_new)]
    got, _ = serve(Engine(tiny, page_size=4, n_pages=20, max_batch_size=3), prompts, n_new, order_seed=1, **kw)
    assert got == want                    # preempted or not, a request's generator is its own


def test_eos_finish_reasons_abort_and_forget(tiny):
    prompt = [3, 1, 4, 1, 5]
    ref = list(generate_tokens(tiny, prompt, 10))
    engine = Engine(tiny, page_size=4)
    stop = engine.add_request(prompt, 10, eos_id=ref[2])
    length = engine.add_request(prompt, 4)
    gone = engine.add_request(prompt, 10)
    zero = engine.add_request(prompt, 0)
    assert engine.finish_reason(zero) == "length" and engine.output(zero) == []
    engine.step()
    assert engine.pages_in_use > 0
    engine.abort_request(gone)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.output(stop) == ref[:3] and engine.finish_reason(stop) == "stop"
    assert engine.output(length) == ref[:4] and engine.finish_reason(length) == "length"
    assert engine.finish_reason(gone) == "abort" and engine.output(gone) == ref[:1]
    assert engine.pages_in_use == 0
    engine.forget(stop)
    with pytest.raises(ValueError, match="no request with id"):
        engine.output(stop)


def test_forget_refuses_a_running_request(tiny):
    engine = Engine(tiny)
    rid = engine.add_request([1, 2], 5)
    with pytest.raises(ValueError, match="has not finished"):
        engine.forget(rid)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_batch_size=0), ValueError, "max_batch_size"),
    (dict(page_size=2.5), TypeError, "page_size"),
    (dict(n_pages=0), ValueError, "n_pages"),
    (dict(max_step_tokens=True), TypeError, "max_step_tokens"),
])
def test_bad_engine_arguments(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        Engine(tiny, **kwargs)


@pytest.mark.parametrize("args, kwargs, error, match", [
    (([], 3), {}, ValueError, "prompt_ids is empty"),
    (([1, 999], 3), {}, ValueError, "outside the vocabulary"),
    (([1], -1), {}, ValueError, "max_new_tokens"),
    (([1] * 30, 20), {}, ValueError, "paged cache's 48 slots"),
    (([1] * 100, 100), {}, ValueError, "max_seq_len=128"),
    (([1], 3), dict(method="top_p"), ValueError, "needs top_p"),
    (([1], 3), dict(eos_id=-1), ValueError, "eos_id"),
])
def test_bad_requests(tiny, args, kwargs, error, match):
    engine = Engine(tiny, page_size=4, n_pages=12)
    with pytest.raises(error, match=match):
        engine.add_request(*args, **kwargs)
    assert not engine.has_unfinished_requests()


def test_engine_needs_a_transformer():
    with pytest.raises(TypeError, match="Transformer"):
        Engine(object())


def test_paged_cache_tables_free_list_and_slots():
    pool = PagedKVCache(n_layers=1, n_pages=6, page_size=4, n_kv_heads=1, head_dim=2)
    pool.grow("a", 5)                     # 2 pages
    pool.grow("b", 4)                     # 1 page
    assert pool.block_tables == {"a": [0, 1], "b": [2]} and pool.pages_in_use == 3
    pool.release("a")
    pool.grow("c", 9)                     # reuses a's pages first
    assert pool.block_tables["c"] == [0, 1, 3]       # a's pages first, in their old order
    assert pool.slots("c", 3, 6).tolist() == slot_indices(pool.block_tables["c"], 4, 3, 6).tolist()
    assert not pool.can_grow("b", 4 * 4) and pool.can_grow("b", 4 * 3)
    with pytest.raises(ValueError, match="needs 3 more pages"):
        pool.grow("b", 16)
    assert slot_indices([5, 2], 4, 2, 7).tolist() == [22, 23, 8, 9, 10]


def test_step_mask_is_block_diagonal_and_causal(tiny):
    engine = Engine(tiny, page_size=4, max_step_tokens=6)
    for p in ([1, 2], [3, 4, 5, 6], [7, 8, 9]):
        engine.add_request(p, 3)
    scheduled = engine.schedule()         # 2 + 4 tokens: the budget; the third request waits
    step = build_step(engine.cache, scheduled)
    assert [n for _, n in scheduled] == [2, 4] and step.tokens.shape == (1, 6)
    assert step.positions.tolist() == [0, 1, 0, 1, 2, 3]
    allowed = step.mask == 0
    assert allowed[:2, 2:].sum() == 0 and allowed[2:, :2].sum() == 0                 # no request sees another
    assert allowed[2:, 2:].tolist() == torch.ones(4, 4).tril().bool().tolist()       # causal inside
    assert step.last == [1, 5]


@pytest.mark.slow
def test_smollm2_random_arrivals_greedy_equal_alone():
    torch.set_num_threads(1)
    gf = read_gguf(fetch_smollm2())
    model, tok = load_gguf_model(gf, max_seq_len=256).eval(), GGUFTokenizer(gf)
    texts = ["The capital of France is", "Once upon a time, a robot", "def fibonacci(n):", "List three colors:",
             "Water boils at", "The best way to learn a language is"]
    prompts, n_new = [tok.encode(t) for t in texts], [5, 12, 8, 10, 3, 12]
    want = [list(generate_tokens(model, p, n)) for p, n in zip(prompts, n_new)]
    got, engine = serve(Engine(model, max_batch_size=4, page_size=4, n_pages=12), prompts, n_new, order_seed=2)
    assert got == want
    assert sum(r.preemptions for r in engine.requests.values()) > 0


def test_checkers_accept_copies_and_refuse_the_library():
    mine = source_copy(paged_cache, "slot_indices")
    assert check.slot_indices(mine)
    assert refused(check.slot_indices(slot_indices), "slot_indices")

    def shared(prompts, page_size):
        seen, partial = set(), 0
        for p in prompts:
            seen |= {tuple(p[:end]) for end in range(page_size, len(p) + 1, page_size)}
            partial += len(p) % page_size > 0
        return len(seen) + partial
    assert check.shared_prefix_pages(shared)


def test_checkers_name_the_usual_mistakes():
    def pool_order(table, page_size, start, end):          # ignores the table: pages in pool order
        return torch.arange(start, end)
    assert not check.slot_indices(pool_order)

    def no_prefix_rule(prompts, page_size):                 # shares equal pages even after different ones
        seen, partial = set(), 0
        for p in prompts:
            seen |= {tuple(p[end - page_size:end]) for end in range(page_size, len(p) + 1, page_size)}
            partial += len(p) % page_size > 0
        return len(seen) + partial
    r = check.shared_prefix_pages(no_prefix_rule)
    assert not r and "everything before it" in str(r)

    def shares_partial(prompts, page_size):                 # shares partial pages too
        return len({tuple(p[:end]) for p in prompts for end in range(page_size, len(p) + page_size, page_size)})
    assert not check.shared_prefix_pages(shares_partial)
