"""Chapter 08 and 08b (course_lib.quant_formats, quant_model, evaluation, fast_cpu, c_step) against independent references: the `gguf` package's quantizers and
dequantizers (bit for bit), PyTorch's own ops (F.linear, kl_div), `transformers` (perplexity, from its
own loss), the gguf reader and chapter 07's loader (GGUF export), plus bad input and the checkers."""
import copy
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

from course_lib.model import ModelArgs, Transformer, from_hf
from course_lib.checks.fast_cpu import check_int4_scales_and_zeros, check_q4_0_to_q4_1, check_repack_rows8
from course_lib.checks.quantization import (check_perplexity, check_quantize_q4_0, check_quantize_q4_1,
                                            check_quantize_q8_0, check_quantize_q8_1)
from course_lib.evaluation import compare_models, logit_metrics, matching_prefix, perplexity
from course_lib.fast_cpu import FastQuantModel, Int4Matmul, int4_scales_and_zeros, q8_0_as_int4, to_int4pack
from course_lib.quant_formats import (absmax_dequantize, absmax_quantize, block_size, dequantize, fake_quantize,
                                      quantization_error, quantize, quantize_q4_0, quantize_q4_1, quantize_q8_0,
                                      round_half_away)
from course_lib.quant_model import (QuantEmbedding, QuantLinear, export_gguf, load_quantized, quantize_model,
                                    save_quantized, set_matmul, weight_bytes)
from course_lib.generation import generate_tokens
from course_lib.weights import fetch_smollm2, load_gguf_model, read_gguf
from shortcuts import refused, source_copy

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
QTYPE = gguf.GGMLQuantizationType
SCHEMES = ["q8_0", "q4_0", "q4_1"]


def edge_rows() -> torch.Tensor:
    "Blocks of 32 that stress the details: zeros, constants, outliers, signs, fp16 limits, halfway values."
    g = torch.Generator().manual_seed(3)
    r = lambda scale=1.0: torch.randn(32, generator=g) * scale
    k = torch.arange(32, dtype=torch.float32)
    rows = [torch.zeros(32), -torch.zeros(32), torch.full((32,), 0.7), torch.full((32,), -3.0),
            torch.full((32,), 1e-3),
            torch.cat([torch.full((31,), 0.01), torch.tensor([9.0])]),           # one positive outlier
            torch.cat([torch.tensor([-9.0]), torch.full((31,), 0.01)]),          # one negative outlier
            -r().abs() * 2 + 0.1, -r().abs() * 5,                                 # negative-dominant
            r(1e-7), r(1e-30), r(6e-5), r(1e4), r(1e5), r(1e30),    # tiny and huge (fp16 limits)
            # (not float32 subnormals like 1e-40: there 1/d overflows to inf and gguf's result comes from an
            # undefined float -> uint8 cast of inf, which differs between platforms)
            k - 16, (k - 16) + 0.5, (k - 15.5) * (16 / 127), k % 16 / 2,        # halfway between levels
            (k - 15.5) / 7.5, k * (15 / 31) / 15 * 31 / 31,
            torch.tensor([1.0, -1.0] * 16), torch.tensor([-1.0, 1.0] * 16),     # ties in |max|
            torch.tensor([2.0, -2.0] + [0.5] * 30)]
    rows += [r() for _ in range(8)]
    return torch.stack(rows)


def halfway_rows(scheme: str) -> torch.Tensor:
    "Blocks built so that x/d (Q8_0) or (x - m)/d (Q4_1) or x/d + 8 (Q4_0) lands on k + 0.5 exactly."
    k = torch.arange(32, dtype=torch.float32)
    if scheme == "q8_0":   # absmax 127 -> d = 1
        return torch.stack([torch.cat([torch.tensor([127.0]), k[1:] - 16.5]), torch.cat([torch.tensor([-127.0]), 16.5 - k[1:]])])
    if scheme == "q4_0":   # max -8 -> d = 1
        return torch.stack([torch.cat([torch.tensor([-8.0]), (k[1:] % 15) - 7.5])])
    return torch.stack([torch.cat([torch.tensor([0.0, 15.0]), (k[2:] % 15) + 0.5])])   # d = 1, m = 0


def matrices():
    g = torch.Generator().manual_seed(0)
    return {"random": torch.randn(48, 256, generator=g), "wide": torch.randn(3, 1536, generator=g) * 0.02,
            "edge": edge_rows(), "one row": torch.randn(1, 32, generator=g)}


# ---------------------------------------------------------------- quantize / dequantize vs gguf

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("what", ["random", "wide", "edge", "one row", "halfway"])
def test_quantize_bit_exact_with_gguf(scheme, what):
    w = halfway_rows(scheme) if what == "halfway" else matrices()[what]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        ref = gguf.quants.quantize(w.numpy(), QTYPE[scheme.upper()])
    ours = quantize(w, scheme)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape
    assert np.array_equal(ours.numpy(), ref), f"{(ours.numpy() != ref).any(1).sum()} rows differ"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_bit_exact_with_gguf(scheme):
    w = torch.cat([matrices()["random"][:, :32 * 4].reshape(-1, 128), edge_rows().reshape(-1, 128)])
    with np.errstate(all="ignore"):
        blocks = gguf.quants.quantize(w.numpy(), QTYPE[scheme.upper()])
        ref = gguf.quants.dequantize(blocks, QTYPE[scheme.upper()])
    ours = dequantize(torch.from_numpy(blocks), scheme, w.shape)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours.numpy()), nan)
    assert np.array_equal(ours.numpy().view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def test_round_half_away_matches_gguf_and_roundf():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 3.2, -3.7, 0.0, 126.5, 1e8 + 0.5])
    assert torch.equal(round_half_away(x), torch.from_numpy(gguf.quants.np_roundf(x.numpy())))
    assert round_half_away(torch.tensor([2.5, -2.5, 0.49999997])).tolist() == [3.0, -3.0, 0.0]


def test_block_layout_by_hand():
    x = torch.arange(32, dtype=torch.float32)[None]        # q4_1: d = 31/15, m = 0, q_j = round(j * 15/31)
    b = quantize(x, "q4_1")[0]
    d = np.float32(31) / np.float32(15)
    assert b[:2].view(torch.float16).item() == float(np.float16(d)) and b[2:4].view(torch.float16).item() == 0.0
    q = [int(math.floor(j * (1 / d) + 0.5)) for j in range(32)]
    assert b[4:].tolist() == [q[j] | (q[j + 16] << 4) for j in range(16)]


@pytest.mark.parametrize("bad, match", [
    (dict(w=torch.zeros(2, 33), scheme="q8_0"), "multiple of 32"),
    (dict(w=torch.zeros(64), scheme="q8_0"), "2-D"),
    (dict(w=torch.zeros(2, 32, dtype=torch.int32), scheme="q8_0"), "floating-point"),
    (dict(w=[[0.0] * 32], scheme="q8_0"), "torch.Tensor"),
    (dict(w=torch.zeros(2, 32), scheme="q5_0"), "scheme must be one of"),
])
def test_quantize_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        quantize(**bad)


def test_dequantize_bad_input():
    b = quantize(torch.randn(2, 64), "q4_1")
    with pytest.raises(ValueError, match="needs 160"):
        dequantize(b, "q4_1", (4, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize(b, "q4_1", (2, 40))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(b.float(), "q4_1", (2, 64))


# ---------------------------------------------------------------- simple schemes and the explorer

def test_absmax_int4_and_int8():
    w = torch.randn(8, 256)
    for bits in (4, 8):
        q, s = absmax_quantize(w, bits, 128)
        groups = w.reshape(8, 2, 128)
        assert torch.allclose(s, groups.abs().amax(-1) / (2 ** (bits - 1) - 1))
        back = absmax_dequantize(q, s, bits)
        assert ((back - w).abs() <= s.repeat_interleave(128, 1) / 2 + 1e-6).all()
    q4, _ = absmax_quantize(w, 4)
    assert q4.shape == (8, 128) and q4.dtype == torch.uint8
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        absmax_quantize(w, 3)


def test_fake_quantize_against_numpy_reference():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 96)).astype(np.float32)
    for bits, gs, sym in [(4, 32, True), (3, 16, False), (8, 96, True), (2, 32, False)]:
        g = w.reshape(6, -1, gs)
        if sym:
            s = np.abs(g).max(-1, keepdims=True) / (2 ** (bits - 1) - 1)
            ref = np.clip(gguf.quants.np_roundf(g * (1 / s)), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) * s
        else:
            lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
            s = (hi - lo) / (2 ** bits - 1)
            ref = np.clip(gguf.quants.np_roundf((g - lo) * (1 / s)), 0, 2 ** bits - 1) * s + lo
        got = fake_quantize(torch.from_numpy(w), bits, gs, sym)
        np.testing.assert_allclose(got.numpy(), ref.reshape(6, 96), rtol=0, atol=1e-6)
        assert len(np.unique(got.numpy()[0, :gs])) <= 2 ** bits
    r = quantization_error(torch.from_numpy(w), 4, 32, False)
    assert r["bits_per_weight"] == 5.0 and r["errors"].shape == (6 * 96,)
    assert math.isclose(r["rmse"], float(np.sqrt(((fake_quantize(torch.from_numpy(w), 4, 32, False).numpy() - w) ** 2).mean())), rel_tol=1e-5)
    assert quantization_error(torch.from_numpy(w), 8, 32)["rmse"] < r["rmse"]
    with pytest.raises(ValueError, match="bits must be an int from 2 to 8"):
        fake_quantize(torch.from_numpy(w), 9)
    with pytest.raises(ValueError, match="multiple of 64"):
        fake_quantize(torch.from_numpy(w), 4, 64)


# ---------------------------------------------------------------- QuantLinear and the int4 kernel

@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linear_dequant_is_f_linear_with_gguf_weights(scheme):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    blocks = gguf.quants.quantize(w.numpy(), QTYPE[scheme.upper()])
    w_ref = torch.from_numpy(gguf.quants.dequantize(blocks, QTYPE[scheme.upper()]))
    lin = QuantLinear(64, 96, scheme, torch.from_numpy(blocks), matmul="dequant")
    assert torch.equal(lin(x), F.linear(x, w_ref))
    fast = lin.set_matmul("fast")(x)
    exact = F.linear(x, w_ref)
    assert fast.dtype == torch.float32 and fast.shape == (2, 5, 96)
    assert ((fast - exact).norm() / exact.norm()) < 1e-2           # bf16 activations and scales
    ql = QuantLinear.from_linear(torch.nn.Linear(64, 96, bias=False), scheme)
    assert ql.blocks.shape == (96, 2 * {"q8_0": 34, "q4_0": 18, "q4_1": 20}[scheme])


@pytest.mark.parametrize("scheme", ["q4_0", "q4_1"])
def test_int4pack_mapping_is_exact_in_float32(scheme):
    "With float32 scales the kernel reproduces gguf's dequantized weights: scale d, zero m + 8d (or 0)."
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(64, 128, generator=g), torch.randn(3, 128, generator=g)
    blocks = gguf.quants.quantize(w.numpy(), QTYPE[scheme.upper()])
    w_ref = torch.from_numpy(gguf.quants.dequantize(blocks, QTYPE[scheme.upper()]))
    packed, sz = to_int4pack(torch.from_numpy(blocks), scheme, (64, 128), dtype=torch.float32)
    assert packed.shape == (64, 64) and sz.shape == (4, 64, 2)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    torch.testing.assert_close(y, x @ w_ref.T, atol=1e-4, rtol=1e-5)
    # identity activations read the weights back: every weight, exactly
    eye = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(128), packed, 32, sz)   # (in, out) = W.T
    torch.testing.assert_close(eye, w_ref.T, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="4-bit scheme"):
        to_int4pack(torch.from_numpy(blocks), "q8_0", (64, 128))


def test_quant_linear_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantLinear(40, 8, "q4_0")
    with pytest.raises(ValueError, match="blocks must be uint8"):
        QuantLinear(64, 8, "q4_0", torch.zeros(8, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="matmul must be one of"):
        QuantLinear(64, 8, "q4_0", matmul="gpu")
    with pytest.raises(ValueError, match="in_features=64"):
        QuantLinear(64, 8, "q4_0")(torch.zeros(2, 32))


def test_quant_embedding_rows():
    w = torch.randn(50, 64)
    emb = QuantEmbedding(50, 64, "q8_0", quantize(w, "q8_0"))
    tokens = torch.tensor([[3, 0, 49], [7, 7, 1]])
    ref = torch.from_numpy(gguf.quants.dequantize(quantize(w, "q8_0").numpy(), QTYPE.Q8_0))
    assert torch.equal(emb(tokens), ref[tokens])


# ---------------------------------------------------------------- quantize_model, save/load, GGUF export

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128, max_seq_len=64,
                 tie_embeddings=True)


def small_model(tied=True, seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(**{**ARGS.__dict__, "tie_embeddings": tied})).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)   # larger weights: logits that actually depend on them
    return m


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("output_scheme", [None, "q8_0"])
def test_quantize_model_equals_model_with_gguf_weights(scheme, output_scheme):
    model = small_model()
    ref = copy.deepcopy(model)
    with torch.no_grad():   # the same model, weights replaced by gguf's quantize -> dequantize
        for name, p in ref.named_parameters():
            is_emb = name == "tok_embeddings.weight"
            if p.dim() == 2 and (not is_emb or output_scheme):
                qt = QTYPE[(output_scheme if is_emb else scheme).upper()]
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qt), qt)))
    q = quantize_model(model, scheme, output_scheme, matmul="dequant")
    assert q is model and isinstance(q.layers[1].feed_forward.w2, QuantLinear)
    assert isinstance(q.layers[0].attention_norm.weight, torch.nn.Parameter)
    assert q.layers[0].attention_norm.weight.dtype == torch.float32
    assert isinstance(q.tok_embeddings, QuantEmbedding) == (output_scheme is not None)
    tokens = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(q(tokens), ref(tokens), atol=1e-5, rtol=1e-5)
        fast = set_matmul(q, "fast")(tokens)
    assert logit_metrics(ref(tokens), fast)["top1"] >= 0.9


def test_quantize_model_bad_input_and_memory():
    model = small_model()
    before = weight_bytes(model)
    assert before == sum(p.numel() * 4 for p in model.parameters())      # tied: counted once
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_model(model, "int4")
    with pytest.raises(ValueError, match="matmul must be one of"):
        quantize_model(model, "q4_0", matmul="cuda")
    with pytest.raises(TypeError, match="Transformer"):
        quantize_model(torch.nn.Linear(64, 64), "q4_0")
    q = quantize_model(model, "q4_0", "q8_0", matmul="dequant")
    n_lin = 2 * (3 * 64 * 64 // 2 + 64 * 64 // 2 * 2 // 2 + 3 * 64 * 128)  # not used: count from shapes
    blocks = sum(m.blocks.numel() for m in q.modules() if isinstance(m, QuantLinear) and m is not q.output)
    assert weight_bytes(q) == blocks + q.tok_embeddings.blocks.numel() + 4 * (2 * 2 * 64 + 64)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "q4_0")


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_roundtrip(tmp_path, tied):
    pytest.importorskip("safetensors")
    q = quantize_model(small_model(tied), "q4_1", "q8_0", matmul="dequant")
    path = save_quantized(q, tmp_path / "m.safetensors")
    loaded = load_quantized(path, matmul="dequant")
    tokens = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), q(tokens))
    for (k, a), (k2, b) in zip(q.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    if tied:
        assert loaded.output.blocks is loaded.tok_embeddings.blocks


def test_load_quantized_validates(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    q = quantize_model(small_model(), "q4_0", "q8_0", matmul="dequant")
    path = save_quantized(q, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    def write(name, meta=meta, tensors=tensors):
        save_file(tensors, str(tmp_path / name), metadata=meta)
        return tmp_path / name
    with pytest.raises(ValueError, match="format_version='2'"):
        load_quantized(write("v2.safetensors", {**meta, "format_version": "2"}))
    with pytest.raises(ValueError, match="not a course_lib quantized model"):
        load_quantized(write("pt.safetensors", {"format": "pt"}))
    bad = dict(tensors); bad["layers.0.attention.wq.blocks"] = bad["layers.0.attention.wq.blocks"][:, :-18].contiguous()
    with pytest.raises(ValueError, match="layers.0.attention.wq.blocks"):
        load_quantized(write("shape.safetensors", tensors=bad))
    with pytest.raises(ValueError, match="schemes"):
        load_quantized(write("scheme.safetensors", {**meta, "quant_config": '{"scheme": "q4_1", "output_scheme": "q8_0"}'}))
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(small_model(), tmp_path / "x.safetensors")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_export_gguf_roundtrip(tmp_path, scheme):
    q = quantize_model(small_model(), scheme, "q8_0", matmul="dequant")
    path = export_gguf(q, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert QTYPE(tensors["blk.1.ffn_down.weight"].tensor_type).name == scheme.upper()
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(-1),
                          q.layers[1].feed_forward.w2.blocks.numpy().reshape(-1))
    assert "output.weight" not in tensors                                 # tied
    reread = load_gguf_model(path)
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reread(tokens), q(tokens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- perplexity and metrics

def hf_small():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return hf, from_hf(hf).eval()


def hf_perplexity(hf, ids, context_len, stride):
    "Hugging Face's recipe (docs: perplexity of fixed-length models), but with exact token counts."
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context_len, len(ids))
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll += loss.item() * n; count += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("context_len, stride", [(16, 16), (16, 5), (64, 64), (20, 20), (8, 1)])
def test_perplexity_matches_transformers_small(context_len, stride):
    hf, ours = hf_small()
    ids = torch.randint(0, 96, (53,), generator=torch.Generator().manual_seed(1))
    ref = hf_perplexity(hf, ids, context_len, stride)
    got = perplexity(ours, ids, context_len, stride)
    assert abs(got - ref) / ref <= 1e-4


def test_perplexity_by_hand_and_bad_input():
    class Uniform(torch.nn.Module):   # every next-token distribution uniform: perplexity = vocab size
        def forward(self, tokens, start_pos=0):
            return torch.zeros(*tokens.shape, 37)
    assert math.isclose(perplexity(Uniform(), torch.arange(30) % 37, 8), 37.0, rel_tol=1e-6)
    _, ours = hf_small()
    with pytest.raises(ValueError, match="max_seq_len=64"):
        perplexity(ours, torch.arange(10), 128)
    with pytest.raises(ValueError, match="stride must be"):
        perplexity(ours, torch.arange(10), 8, 9)
    with pytest.raises(ValueError, match="1-D sequence"):
        perplexity(ours, torch.zeros(2, 5, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="context_len must be"):
        perplexity(ours, torch.arange(10), 1)



def test_long_operations_show_a_progress_bar(capsys):
    "perplexity, compare_models and quantize_model draw a tqdm bar on stderr when asked, and nothing otherwise."
    _, ours = hf_small()
    ids = torch.arange(40) % 96
    perplexity(ours, ids, 16)
    assert capsys.readouterr().err == ""
    perplexity(ours, ids, 16, progress=True)
    assert "perplexity: 100%" in capsys.readouterr().err            # 40 tokens in windows of 16: 3 windows
    compare_models(ours, ours, ids, 16, progress=True)
    assert "comparing: 100%" in capsys.readouterr().err
    quantize_model(copy.deepcopy(ours), "q8_0", progress=True)
    err = capsys.readouterr().err
    assert "quantizing to q8_0: 100%" in err and f"{ours.args.n_layers}/{ours.args.n_layers}" in err

def test_logit_metrics_against_kl_div():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 7, 50, generator=g), torch.randn(2, 7, 50, generator=g)
    m = logit_metrics(a, b)
    ref = F.kl_div(F.log_softmax(b, -1).reshape(-1, 50), F.log_softmax(a, -1).reshape(-1, 50),
                   log_target=True, reduction="batchmean")
    assert math.isclose(m["kl"], ref.item(), rel_tol=1e-5)
    assert m["top1"] == (a.argmax(-1) == b.argmax(-1)).float().mean().item() and m["n"] == 14
    assert logit_metrics(a, a)["kl"] == pytest.approx(0, abs=1e-6) and logit_metrics(a, a)["top1"] == 1.0
    with pytest.raises(ValueError, match="same shape"):
        logit_metrics(a, b[:, :3])


# ---------------------------------------------------------------- the lean decoder (FastQuantModel)

def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_q8_0_as_int4_rebuilds_every_weight_exactly():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g) * 3
    w[0] = 0; w[1, :32] = 0.7; w[2, 5] = 40.0; w[3] = -w[3].abs()        # zero, constant, outlier, all negative
    blocks = quantize(w, "q8_0")
    blocks.view(-1, 34)[0, 2] = 0x80                                       # q = -128: legal in a GGUF file
    packed, sz = q8_0_as_int4(blocks, tuple(w.shape))
    assert packed.dtype == torch.uint8 and sz.shape == (2 * w.shape[1] // 32, w.shape[0], 2)
    d = blocks.view(-1, 34)[:, :2].contiguous().view(torch.float16).float()
    q = blocks.view(-1, 34)[:, 2:].contiguous().view(torch.int8).to(torch.int32)
    hi, lo = torch.div(q, 16, rounding_mode="floor"), q % 16
    assert hi.min() >= -8 and hi.max() <= 7 and torch.equal(16 * hi + lo, q)
    eye = torch.eye(w.shape[1]).bfloat16()
    w_kernel = Int4Matmul(blocks, "q8_0", tuple(w.shape))(eye).float().T   # (out, in): the weights the kernel uses
    ref = dequantize(blocks, "q8_0", tuple(w.shape))
    assert _rel(w_kernel, ref) < 5e-3      # d rounded to bf16, and the bf16 output: 2^-9 relative each
    assert torch.equal(w_kernel == 0, ref == 0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_int4_matmul_matches_the_dequantized_product(scheme):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 96, generator=g)                                   # rows: not a multiple of anything
    blocks = quantize(w, scheme)
    x = torch.randn(3, 96, generator=g).bfloat16()
    got = Int4Matmul(blocks, scheme, (37, 96))(x)
    exact = F.linear(x.float(), dequantize(blocks, scheme, (37, 96)))
    assert got.shape == (3, 37) and got.dtype == torch.bfloat16 and _rel(got, exact) < 1e-2


def test_int4_matmul_repr_and_scales_and_zeros():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    assert repr(Int4Matmul(quantize(w, "q4_1"), "q4_1", (16, 64))) == "Int4Matmul(64, 16, scheme=q4_1)"
    for scheme in ("q4_0", "q4_1"):
        blocks = quantize(w, scheme)
        sz = int4_scales_and_zeros(blocks, scheme)                          # (n_blocks, 2): [scale, zero]
        q = torch.cat([blocks.reshape(-1, blocks.shape[1] // 2)[:, -16:] & 0x0F,
                       blocks.reshape(-1, blocks.shape[1] // 2)[:, -16:] >> 4], dim=1).float()   # (n_blocks, 32)
        rebuilt = ((q - 8) * sz[:, :1] + sz[:, 1:]).reshape(16, 64)
        assert torch.allclose(rebuilt, dequantize(blocks, scheme, (16, 64)), rtol=1e-6, atol=1e-7)
    assert block_size("Q4_1") == 32
    with pytest.raises(ValueError, match="4-bit scheme"):
        int4_scales_and_zeros(quantize(w, "q8_0"), "q8_0")


def fast_cpu_copies():
    "Fresh copies of 08b's answers (what a student who retyped them hands in); the checkers refuse the originals."
    import course_lib.c_step
    import course_lib.fast_cpu
    return (source_copy(course_lib.fast_cpu, "int4_scales_and_zeros"), source_copy(course_lib.c_step, "repack_rows8"))


def test_fast_cpu_checkers_pass_the_course_and_catch_mistakes():
    own_scales, own_repack = fast_cpu_copies()
    assert check_int4_scales_and_zeros(own_scales) and check_repack_rows8(own_repack)

    def zero_is_m(blocks, scheme):
        sz = own_scales(blocks, scheme)
        return torch.stack([sz[:, 0], sz[:, 1] - 8 * sz[:, 0]], dim=1)
    assert "zero is m: the kernel computes" in str(check_int4_scales_and_zeros(zero_is_m))
    assert "should be a torch.Tensor" in str(check_int4_scales_and_zeros(lambda b, s: [1.0, 2.0]))

    def no_sign_flip(blocks, scheme):
        out = own_repack(blocks, scheme)
        if scheme == "q8_0":
            out[..., 16:] ^= 0x80
        return out
    result = check_repack_rows8(no_sign_flip)
    assert not result and "q8_0: group 0, block 0, byte 16" in str(result) and "flip the sign bit" in str(result)
    unpadded = check_repack_rows8(lambda b, s: own_repack(b, s)[: len(b) // 8])
    assert not unpadded and "shape" in str(unpadded)


def test_fast_cpu_checkers_refuse_the_library_answers():
    "Issue 16: the library's own int4_scales_and_zeros and repack_rows8 (and to_int4pack, which computes the former) are switched off."
    from course_lib.c_step import repack_rows8
    assert refused(check_int4_scales_and_zeros(int4_scales_and_zeros), "is course_lib.fast_cpu.int4_scales_and_zeros itself")
    assert refused(check_repack_rows8(repack_rows8), "is course_lib.c_step.repack_rows8 itself")
    assert refused(check_int4_scales_and_zeros(lambda b, s: int4_scales_and_zeros(b, s)), "course_lib.fast_cpu.int4_scales_and_zeros")
    assert refused(check_repack_rows8(lambda b, s: repack_rows8(b, s)), "course_lib.c_step.repack_rows8")

    def via_to_int4pack(blocks, scheme):       # the kernel's layout, transposed back: the same numbers
        _, sz = to_int4pack(blocks, scheme, (len(blocks), 32), dtype=torch.float32)
        return sz[0]
    assert refused(check_int4_scales_and_zeros(via_to_int4pack), "course_lib.fast_cpu.to_int4pack")


def test_check_q4_0_to_q4_1():
    "08b's Exercise 3, which the reading edition does not show: Q4_0 blocks rewritten as Q4_1, exactly."
    def answer(blocks):
        d = blocks[:, :2].contiguous().view(torch.float16)
        return torch.cat([blocks[:, :2], (-8 * d.float()).half().view(torch.uint8), blocks[:, 2:]], dim=1)
    assert check_q4_0_to_q4_1(answer)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    b0 = quantize(w, "q4_0")
    assert torch.equal(dequantize(b0, "q4_0", w.shape), dequantize(answer(b0.reshape(-1, 18)).reshape(8, -1), "q4_1", w.shape))

    def plus_8d(blocks):
        out = answer(blocks)
        out[:, 2:4] = (8 * blocks[:, :2].contiguous().view(torch.float16).float()).half().view(torch.uint8)
        return out

    def m_first(blocks):
        out = answer(blocks)
        return torch.cat([out[:, 2:4], out[:, :2], out[:, 4:]], dim=1)

    def requantized(blocks):
        from course_lib.gguf_format import dequantize_q4_0
        return _copy_quantize_q4_1()(dequantize_q4_0(blocks))

    def shifted_nibbles(blocks):                       # moves the -8 into the nibbles: no longer 0..15
        out = answer(blocks)
        out[:, 4:] = out[:, 4:] ^ 0x88
        return out
    for wrong, message in [(plus_8d, "m = +8d"), (m_first, "writes m before d"), (requantized, "requantizes"),
                           (shifted_nibbles, "bytes differ"), (lambda b: b, "shape")]:
        result = check_q4_0_to_q4_1(wrong)
        assert not result and message in str(result), (message, str(result))
    from course_lib.checks.fast_cpu import _q4_0_to_q4_1_reference
    assert refused(check_q4_0_to_q4_1(lambda b: _q4_0_to_q4_1_reference(b)), "_q4_0_to_q4_1_reference")


def _copy_quantize_q4_1():
    import course_lib.quant_formats as module
    return source_copy(module, "round_half_away", "_reciprocal", "_fp16_bytes", "_pack_nibbles", "quantize_q4_1")[-1]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tied", [True, False])
def test_fast_quant_model_matches_the_quantized_transformer(scheme, tied):
    q = quantize_model(small_model(tied), scheme, "q8_0", matmul="dequant")
    fast = FastQuantModel(q)
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = q(tokens)                                                    # (1, 12, vocab) exact dequantized
        full = fast(tokens)                                                # prefill in one pass
        assert full.shape == ref.shape and full.dtype == torch.float32
        assert _rel(full, ref) < 0.03
        assert fast.cache_len == 12
        # prefill 5, a chunk of 4 at start_pos=5 (masked), then 3 single steps: the same logits
        parts = [fast(tokens[:, :5], 0), fast(tokens[:, 5:9], 5)]
        parts += [fast(tokens[:, i:i + 1], i) for i in range(9, 12)]
        assert _rel(torch.cat(parts, dim=1), ref) < 0.03
        last = fast(tokens, 0, last_only=True)
        assert last.shape == (1, 1, 96) and _rel(last[0, -1], ref[0, -1]) < 0.03


def test_fast_quant_model_with_float_output_and_bad_input():
    q = quantize_model(small_model(), "q4_0", output_scheme=None, matmul="dequant")
    fast = FastQuantModel(q)
    tokens = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel(fast(tokens), q(tokens)) < 0.03
    with pytest.raises(ValueError, match=r"one sequence: tokens must be \(1, seq\), got \(2, 6\)"):
        fast(tokens.repeat(2, 1))
    with pytest.raises(ValueError, match=r"start_pos=7 leaves a gap"):
        fast(tokens[:, :1], 7)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fast(torch.tensor([[96]]), 0)
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        fast(torch.zeros(1, 65, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="integer tensor"):
        fast(torch.zeros(1, 3), 0)
    with pytest.raises(ValueError, match="not quantized"):
        FastQuantModel(small_model())
    with pytest.raises(TypeError, match="must be a course_lib Transformer"):
        FastQuantModel(torch.nn.Linear(2, 2))
    assert weight_bytes(fast) < weight_bytes(small_model())                # caches and RoPE tables not counted


# ---------------------------------------------------------------- the real model (one load for the file)

@pytest.fixture(scope="module")
def smollm2():
    path = fetch_smollm2(progress=False)
    return path, load_gguf_model(path, max_seq_len=256)


@pytest.fixture(scope="module")
def wiki_ids(smollm2):
    transformers = pytest.importorskip("transformers")
    path, _ = smollm2
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = (ROOT / "data" / "wikitext-2-test.txt").read_text(encoding="utf-8")[:4000]
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def test_perplexity_matches_transformers_on_smollm2(smollm2, wiki_ids):
    transformers = pytest.importorskip("transformers")
    path, model = smollm2
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    ids = wiki_ids[:150]
    for context_len, stride in [(64, 64), (64, 40)]:
        ref = hf_perplexity(hf, ids, context_len, stride)
        got = perplexity(model, ids, context_len, stride)
        assert abs(got - ref) / ref <= 1e-4, (context_len, stride, got, ref)


def test_quantized_smollm2_quality_and_tokens(smollm2, wiki_ids):
    _, model = smollm2
    q4 = quantize_model(copy.deepcopy(model), "q4_1")
    r = compare_models(q4, model, wiki_ids[:200], 100)
    assert r["kl"] < 0.05 and r["top1"] > 0.9 and abs(r["perplexity"] / r["reference_perplexity"] - 1) < 0.05
    # teacher-forced along the float32 model's greedy continuation: q4_1 picks the same token nearly always
    prompt = wiki_ids[20:32].tolist()
    ref = list(generate_tokens(model, prompt, 16))
    with torch.no_grad():
        picks = q4(torch.tensor([prompt + ref]), 0)[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert sum(a == b for a, b in zip(picks, ref)) >= 13
    assert matching_prefix(ref, ref) == 16 and matching_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert weight_bytes(q4) < weight_bytes(model) / 3   # int4 layers + the bf16 copy of the q8_0 output


# ---------------------------------------------------------------- checkers

def quantizer_copies():
    "Fresh copies of chapter 08's quantizers, helpers first (what a student who retyped them hands in)."
    import course_lib.quant_formats as module
    copies = source_copy(module, "round_half_away", "_reciprocal", "_fp16_bytes", "_pack_nibbles", "quantize_q8_0",
                         "quantize_q4_0", "quantize_q4_1")
    return dict(zip(["round_half_away", "quantize_q8_0", "quantize_q4_0", "quantize_q4_1"], [copies[0], *copies[4:]]))


def perplexity_copy():
    import course_lib.evaluation as module
    return source_copy(module, "_windows", "perplexity")[1]


def test_checkers_pass_copies_of_the_course_implementation():
    own = quantizer_copies()
    assert check_quantize_q8_0(own["quantize_q8_0"])
    assert check_quantize_q4_1(own["quantize_q4_1"])
    assert check_quantize_q4_0(own["quantize_q4_0"])
    assert check_perplexity(perplexity_copy())          # decorated with @torch.no_grad() like the library's


def test_checkers_pass_independent_implementations():
    assert check_quantize_q4_0(_q4_0)
    assert check_perplexity(_ppl)


def _via_gguf(qtype):
    "llama.cpp's NumPy quantizer (the gguf package): the answer, not the student's code."
    def f(x):
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(x.numpy(), QTYPE[qtype]))).reshape(len(x), -1)
    return f


def test_checkers_refuse_the_library_gguf_and_helper_answers():
    "Issue 16: the library's quantizers, their helpers, gguf's quantizers and the library's perplexity are switched off."
    for check, fn, name in [(check_quantize_q8_0, quantize_q8_0, "quantize_q8_0"),
                            (check_quantize_q4_0, quantize_q4_0, "quantize_q4_0"),
                            (check_quantize_q4_1, quantize_q4_1, "quantize_q4_1")]:
        assert refused(check(fn), f"is course_lib.quant_formats.{name} itself")
        assert refused(check(lambda x, _f=fn: _f(x)), f"course_lib.quant_formats.{name}")
        assert refused(check(_via_gguf(name[-4:].upper())), "gguf.quants")           # the gguf package's answer
        assert refused(check(lambda x: quantize(x, name[-4:]).reshape(len(x), -1)), "course_lib.quant_formats.quantize")
    # calling gguf's block quantizer directly is refused too, not only gguf.quants.quantize
    assert refused(check_quantize_q8_0(lambda x: torch.from_numpy(gguf.quants.Q8_0.quantize_blocks(x.numpy()))),
                   "quantize_blocks")
    # the helpers that do the work: the exact rounding of Q8_0, the nibble packing of Q4
    def with_library_rounding(x):
        d = x.abs().amax(1, keepdim=True) / 127
        q = round_half_away(x * torch.where(d == 0, 0.0, 1 / d))
        return torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], 1)
    assert refused(check_quantize_q8_0(with_library_rounding), "course_lib.quant_formats.round_half_away")
    assert refused(check_perplexity(perplexity), "course_lib.evaluation.perplexity")
    assert refused(check_perplexity(lambda m, ids, n, stride=None: perplexity(m, ids, n, stride)),
                   "course_lib.evaluation.perplexity")

    def via_compare_models(model, token_ids, context_len, stride=None):     # right when stride is None
        return compare_models(model, model, token_ids, context_len)["perplexity"]
    assert refused(check_perplexity(via_compare_models), "course_lib.evaluation.compare_models")


def test_check_quantize_q8_0_catches_mistakes():
    def half_even(x):
        d = x.abs().amax(1, keepdim=True) / 127
        q = torch.round(x / torch.where(d == 0, 1.0, d))
        return torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], 1)
    r = check_quantize_q8_0(half_even)
    assert not r and "half away from zero" in str(r)
    def fp16_first(x):
        d = (x.abs().amax(1, keepdim=True) / 127).half()
        q = quantizer_copies()["round_half_away"](x * torch.where(d == 0, 0.0, 1 / d.float()))
        return torch.cat([d.view(torch.uint8), q.to(torch.int8).view(torch.uint8)], 1)
    r = check_quantize_q8_0(fp16_first)
    assert not r and "float32 d" in str(r)
    def stub(x):
        raise NotImplementedError
    assert "NotImplementedError" in str(check_quantize_q8_0(stub))


def test_check_quantize_q4_1_catches_mistakes():
    def interleaved(x):
        mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        d = (mx - mn) / 15
        q = ((x - mn) * torch.where(d == 0, 0.0, 1 / d) + 0.5).trunc().clamp(0, 15).to(torch.uint8)
        return torch.cat([d.half().view(torch.uint8), mn.half().view(torch.uint8), q[:, 0::2] | (q[:, 1::2] << 4)], 1)
    r = check_quantize_q4_1(interleaved)
    assert not r and "interleaved" in str(r)
    def half_even(x):
        mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        d = (mx - mn) / 15
        q = torch.round((x - mn) * torch.where(d == 0, 0.0, 1 / d)).clamp(0, 15).to(torch.uint8)
        return torch.cat([d.half().view(torch.uint8), mn.half().view(torch.uint8), q[:, :16] | (q[:, 16:] << 4)], 1)
    r = check_quantize_q4_1(half_even)
    assert not r and "half to even" in str(r)
    def fp16_d(x):
        mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        d = ((mx - mn) / 15).half().float()
        q = ((x - mn) * torch.where(d == 0, 0.0, 1 / d) + 0.5).trunc().clamp(0, 15).to(torch.uint8)
        return torch.cat([d.half().view(torch.uint8), mn.half().view(torch.uint8), q[:, :16] | (q[:, 16:] << 4)], 1)
    r = check_quantize_q4_1(fp16_d)
    assert not r and "float32 d" in str(r)


def _q4_0(x, d=None, round_=lambda v: (v + 8.5).trunc(), pack=lambda q: q[:, :16] | (q[:, 16:] << 4), clamp=True):
    "A from-scratch Q4_0 quantizer with switches for the usual mistakes."
    if d is None:
        d = x.gather(1, x.abs().argmax(1, keepdim=True)) / -8
    q = round_(x * torch.where(d == 0, 0.0, 1 / d))
    q = (q.clamp(0, 15) if clamp else q).to(torch.uint8)
    return torch.cat([d.half().view(torch.uint8), pack(q)], 1)


def test_check_quantize_q4_0_catches_mistakes():
    assert check_quantize_q4_0(_q4_0)
    r = check_quantize_q4_0(lambda x: _q4_0(x, d=x.abs().amax(1, keepdim=True) / -8))
    assert not r and "d is absmax / -8" in str(r) and "one block -16" in str(r)
    r = check_quantize_q4_0(lambda x: _q4_0(x, d=x.abs().amax(1, keepdim=True) / 7, round_=lambda v: (v + 8).round()))
    assert not r and "d is absmax / 7" in str(r) and len(r.failures) == 7   # a symmetric scale: wrong everywhere
    r = check_quantize_q4_0(lambda x: _q4_0(x, round_=lambda v: torch.round(v + 8)))
    assert not r and "half to even" in str(r) and "halfway" in str(r)
    r = check_quantize_q4_0(lambda x: _q4_0(x, pack=lambda q: q[:, 0::2] | (q[:, 1::2] << 4)))
    assert not r and "interleaved" in str(r)
    r = check_quantize_q4_0(lambda x: _q4_0(x, pack=lambda q: q[:, 16:] | (q[:, :16] << 4)))
    assert not r and "they belong in the LOW nibbles" in str(r)
    r = check_quantize_q4_0(lambda x: _q4_0(x, clamp=False))
    assert not r and "not clamped to 15" in str(r)
    def fp16_d(x):
        d = (x.gather(1, x.abs().argmax(1, keepdim=True)) / -8).half().float()
        return _q4_0(x, d=d)
    r = check_quantize_q4_0(fp16_d)
    assert not r and "float32 d" in str(r)
    def stub(x):
        raise NotImplementedError
    assert len(check_quantize_q4_0(stub).failures) == 1


def _appendix_q8_1():
    "Exercise 1's answer, run from 08's appendix cell itself (its source up to the checker call)."
    cells = json.loads((ROOT / "notebooks" / "08_quantization.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("def quantize_q8_1(x):"))
    namespace = {"torch": torch}
    exec(source.split("\nprint(")[0], namespace)
    return namespace["quantize_q8_1"]


def _q8_1_from(d, q, s):
    "(n, 1) float32 d, (n, 32) q, (n, 1) float32 s -> (n, 36) Q8_1 bytes."
    return torch.cat([d.half().view(torch.uint8), s.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], 1)


def _q8_1_parts(x, signed_max=False, half_even=False):
    "d and q as Q8_0 computes them (or with one mistake), from scratch."
    d = (x.gather(1, x.abs().argmax(1, keepdim=True)) if signed_max else x.abs().amax(1, keepdim=True)) / 127
    v = x * torch.where(d == 0, 0.0, 1 / d)
    q = torch.round(v) if half_even else torch.sign(v) * (v.abs().floor() + (v.abs() - v.abs().floor() >= 0.5))
    return d, q


def test_q8_1_reference_is_llama_cpps():
    "Exercise 1's reference: d and q are gguf's Q8_0 bytes and decode through gguf; s is quantize_row_q8_1_ref's."
    from course_lib.checks.quantization import _float_sum_blocks, _quantize_q8_1_reference
    x = torch.cat([edge_rows(), torch.randn(64, 32, generator=torch.Generator().manual_seed(9)) * 2,
                   _float_sum_blocks()]).reshape(-1, 32)
    got = _quantize_q8_1_reference(x)
    assert got.shape == (len(x), 36)
    with np.errstate(over="ignore"):           # edge rows near fp16's max: d and s overflow to inf, as in C
        q8_0 = gguf.quants.quantize(x.numpy(), QTYPE["Q8_0"]).reshape(len(x), 34)
    assert np.array_equal(np.concatenate([got[:, :2].numpy(), got[:, 4:].numpy()], 1), q8_0)
    decoded = gguf.quants.dequantize(q8_0.reshape(-1), QTYPE["Q8_0"]).reshape(len(x), 32)
    # s, as the C loop computes it: int sum of the int8 q, times the float32 d (int * float -> float), then fp16
    q = q8_0[:, 2:].view(np.int8).astype(np.int32)
    d = (np.abs(x.numpy()).max(1) / np.float32(127)).astype(np.float32)
    with np.errstate(over="ignore"):
        s_c = (q.sum(1).astype(np.float32) * d).astype(np.float32).astype(np.float16)
    assert np.array_equal(got[:, 2:4].numpy().view(np.float16)[:, 0], s_c)
    # its d and q decode through gguf (whose Q8_1 dequantize raises NotImplementedError in gguf 0.19: Q8_0 decodes them)
    ours = np.concatenate([got[:, :2].numpy(), got[:, 4:].numpy()], 1).reshape(-1)
    assert np.array_equal(gguf.quants.dequantize(ours, QTYPE["Q8_0"]).reshape(len(x), 32), decoded)
    # the integer sum matters: summing q_j * d in float32, in C's order, rounds these blocks' s elsewhere
    tail = slice(len(x) - 5, None)
    float_sum = np.zeros(5, np.float32)
    for j in range(32):
        float_sum = (float_sum + (q[tail, j].astype(np.float32) * d[tail]).astype(np.float32)).astype(np.float32)
    assert (float_sum.astype(np.float16) != s_c[tail]).all()


def test_check_quantize_q8_1():
    "08's Exercise 1: the appendix's answer passes; the usual mistakes are named; the answers are refused."
    answer = _appendix_q8_1()
    assert check_quantize_q8_1(answer)
    def s_wrong(s_of):
        def f(x):
            d, q = _q8_1_parts(x)
            return _q8_1_from(d, q, s_of(x, d, q))
        return f
    def q8_0_layout(x):
        d, q = _q8_1_parts(x)
        return torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], 1)
    def with_parts(**mistake):
        def f(x):
            d, q = _q8_1_parts(x, **mistake)
            return _q8_1_from(d, q, q.sum(1, keepdim=True) * d)
        return f
    for wrong, message in [(s_wrong(lambda x, d, q: x.sum(1, keepdim=True)), "sum of the unrounded x"),
                           (s_wrong(lambda x, d, q: q.sum(1, keepdim=True)), "sum(q) without d"),
                           (s_wrong(lambda x, d, q: q.sum(1, keepdim=True) * d.half().float()), "d rounded to fp16"),
                           (s_wrong(lambda x, d, q: (q * d).sum(1, keepdim=True)), "sums the products q * d"),
                           (q8_0_layout, "Q8_0's 34-byte layout"),
                           (with_parts(signed_max=True), "signed max / 127"),
                           (with_parts(half_even=True), "half to even"),
                           (lambda x: _q4_0(x), "shape")]:
        result = check_quantize_q8_1(wrong)
        assert not result and message in str(result), (message, str(result))
    def stub(x):
        raise NotImplementedError
    assert len(check_quantize_q8_1(stub).failures) == 1
    def via_gguf_q8_0(x):                            # gguf's Q8_0 bytes with s slotted in
        b = _via_gguf("Q8_0")(x)
        d = b[:, :2].contiguous().view(torch.float16).float()
        s = b[:, 2:].view(torch.int8).float().sum(1, keepdim=True) * d
        return torch.cat([b[:, :2], s.half().view(torch.uint8), b[:, 2:]], 1)
    assert refused(check_quantize_q8_1(via_gguf_q8_0), "gguf.quants")
    def via_library_q8_0(x):
        b = quantize_q8_0(x)
        return torch.cat([b[:, :2], torch.zeros(len(x), 2, dtype=torch.uint8), b[:, 2:]], 1)
    assert refused(check_quantize_q8_1(via_library_q8_0), "quantize_q8_0")
    from course_lib.checks.quantization import _quantize_q8_1_reference
    assert refused(check_quantize_q8_1(lambda x: _quantize_q8_1_reference(x)), "_quantize_q8_1_reference")


def _ppl(model, token_ids, context_len, stride=None, *, shift="right", per_window=False, count_first=False,
         first_targets=False, all_targets=False, no_exp=False, ignore_stride=False):
    "A from-scratch sliding-window perplexity (Hugging Face's recipe) with switches for the usual mistakes."
    ids = torch.as_tensor(token_ids).long()
    stride = context_len if stride is None or ignore_stride else stride
    total, count, means, prev_end = 0.0, 0, [], 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + context_len, len(ids))
            n_new = min(end - prev_end, end - begin - 1)
            prev_end = end
            if n_new > 0:
                window = ids[begin:end]
                logp = torch.log_softmax(model(window[None], 0)[0].float(), -1)
                target = window[1:] if shift == "right" else window[:-1]  # "same": logits[i] against token i
                nll = -logp[:-1].gather(1, target[:, None])[:, 0]
                nll = nll if all_targets else nll[:n_new] if first_targets else nll[-n_new:]
                total += nll.double().sum().item()
                count += nll.numel() + (1 if count_first else 0)
                means.append(nll.double().mean().item())
            if end == len(ids):
                break
    mean = sum(means) / len(means) if per_window else total / count
    return mean if no_exp else math.exp(mean)


@pytest.mark.parametrize("mistake,message", [
    ({"per_window": True}, "averages the per-window mean NLLs"),
    ({"count_first": True}, "counts the first token of each window"),
    ({"first_targets": True}, "scores the first n_scored targets of each window"),
    ({"all_targets": True}, "counting the overlap again"),
    ({"shift": "same"}, "is off by one: position i's logits predict token i \\+ 1"),
    ({"ignore_stride": True}, "ignores stride"),
    ({"no_exp": True}, "returns the mean NLL"),
])
def test_check_perplexity_catches_mistakes(mistake, message):
    result = check_perplexity(lambda *args, **kwargs: _ppl(*args, **kwargs, **mistake))
    assert not result and re.search(message, str(result)), str(result)


def test_check_perplexity_stub_type_and_rng():
    def stub(model, token_ids, context_len, stride=None):
        raise NotImplementedError
    assert len(check_perplexity(stub).failures) == 1
    r = check_perplexity(lambda *args, **kwargs: torch.tensor([_ppl(*args, **kwargs)] * 2))
    assert not r and "should return a float, got Tensor" in str(r)
    state = torch.get_rng_state()
    check_perplexity(perplexity)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(TypeError):
        check_perplexity("perplexity")


def test_fast_quant_model_on_smollm2_stays_close_to_float32(smollm2, wiki_ids):
    _, model = smollm2
    fast = FastQuantModel(quantize_model(copy.deepcopy(model), "q4_1"))
    ids = wiki_ids[:120]
    with torch.no_grad():
        ref, got = model(ids[None]), fast(ids[None])
    r = logit_metrics(ref[0], got[0])
    assert r["kl"] < 0.05 and r["top1"] > 0.9
    tokens = list(generate_tokens(fast, ids[:12].tolist(), 8))            # generate_tokens drives it as is
    assert len(tokens) == 8


# ---------------------------------------------------------------- the whole decode step in C (FastQuantModel kernel="c")
from course_lib import c_step as _c_step                                         # noqa: E402
from course_lib.c_step import (CCompilerError, CDecodeStep, build_c_step, c_matvec, c_simd_level,  # noqa: E402
                               c_source, find_c_compiler, repack_rows8, unpack_rows8)

needs_cc = pytest.mark.skipif(find_c_compiler() is None, reason="no C compiler")
# the code paths of csrc/decode_step.c: what -march=native picks, AVX2 without VNNI, and the plain-C loops
C_PATHS = [(), ("COURSE_NO_VNNI",), ("COURSE_PORTABLE",)]
TINY = ModelArgs(dim=192, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=1001, hidden_dim=320, max_seq_len=48,
                 tie_embeddings=False)                                           # GQA 3, vocab not a multiple of 8 or 16


def tiny_model(tied=False, seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(**{**TINY.__dict__, "tie_embeddings": tied})).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return m


def emulated_matvec(blocks, scheme, shape, x):
    "The C matvec's arithmetic, independently: x rounded to int8 blocks (half to even), exact weights, float64 sums."
    w = dequantize(blocks, scheme, shape).double()
    xb = x.double().reshape(-1, 32)
    d = xb.abs().amax(1, keepdim=True).float().div(127).double()                 # d = absmax / 127 in float32
    q = torch.where(d > 0, torch.round(xb.float() * (127 / xb.abs().amax(1, keepdim=True).float())).double(), 0 * xb)
    return w @ (q * d).reshape(-1)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [8, 21, 1001])
def test_repack_rows8_is_a_permutation_of_the_gguf_bytes(scheme, rows):
    blocks = quantize(torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)), scheme)
    p = repack_rows8(blocks, scheme)
    assert p.shape == ((rows + 7) // 8, 3, 8 * blocks.shape[1] // 3) and p.dtype == torch.uint8
    assert torch.equal(unpack_rows8(p, scheme, rows), blocks)
    bb, r = blocks.shape[1] // 3, rows - 1                                         # the last real row, block 2
    g, lane, blk = p[r // 8, 2], r % 8, blocks[r, 2 * bb:3 * bb]
    assert g[2 * lane:2 * lane + 2].tolist() == blk[:2].tolist()                  # its d among the group's 8
    if scheme == "q8_0":                                                         # chunk t: its values 4t.. + 128
        assert [(v - 128) % 256 for v in g[16 + 32 * 1 + 4 * lane:16 + 32 * 1 + 4 * lane + 4].tolist()] == \
            blk[2 + 4:2 + 8].tolist()
    else:                                                                        # chunk c: its nibble bytes 4c..
        off = 32 if scheme == "q4_1" else 16
        assert g[off + 32 * 3 + 4 * lane:off + 32 * 3 + 4 * lane + 4].tolist() == blk[bb - 16 + 12:bb].tolist()
    with pytest.raises(ValueError, match="uint8"):
        repack_rows8(blocks.float(), scheme)


@needs_cc
@pytest.mark.parametrize("defines", C_PATHS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_c_matvec_is_the_int8_activation_product(scheme, defines):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(37, 320, generator=g), torch.randn(320, generator=g) * 3
    x[5] = 40.0                                                                  # an outlier: its block's d is large
    x[64:96] = 0.0                                                               # an all-zero block: d = 0
    blocks = quantize(w, scheme)
    y = c_matvec(blocks, scheme, x, defines=defines)
    ref = emulated_matvec(blocks, scheme, (37, 320), x)
    assert (y.double() - ref).abs().max() <= 2e-5 * ref.abs().max(), (y - ref).abs().max()
    exact = dequantize(blocks, scheme, (37, 320)) @ x                            # and the rounding is small
    assert ((y - exact).norm() / exact.norm()) < 0.02


@needs_cc
def test_c_paths_compile_and_report_their_simd():
    assert c_simd_level(build_c_step(("COURSE_PORTABLE",))) == "portable"
    native = c_simd_level(build_c_step())
    assert native in ("portable", "avx2", "avx512-vnni")
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if " avx512_vnni" in flags and " avx2" in flags:
        assert native == "avx512-vnni"
        assert c_simd_level(build_c_step(("COURSE_NO_VNNI",))) == "avx2"


@needs_cc
def test_the_environment_can_force_the_portable_loops(monkeypatch):
    "tools/portable_outputs.sh re-runs the notebooks this way: stored outputs must not depend on the SIMD branch."
    monkeypatch.setenv("COURSE_LIB_C_DEFINES", "COURSE_PORTABLE")
    assert c_simd_level(build_c_step()) == "portable"
    monkeypatch.setenv("COURSE_LIB_C_DEFINES", "COURSE_FAST")
    with pytest.raises(ValueError, match="COURSE_LIB_C_DEFINES: unknown 'COURSE_FAST'; known: COURSE_PORTABLE"):
        build_c_step()


@needs_cc
@pytest.mark.parametrize("defines", C_PATHS)
@pytest.mark.parametrize("scheme,output_scheme,tied", [("q4_1", "q8_0", False), ("q4_0", "q4_1", True),
                                                       ("q8_0", "q4_0", False), ("q4_1", None, False)])
def test_c_step_matches_the_dequantized_transformer(scheme, output_scheme, tied, defines):
    q = quantize_model(tiny_model(tied), scheme, output_scheme, matmul="dequant")
    fast = FastQuantModel(q, kernel="c")
    fast.c_step = CDecodeStep(q, defines)
    tokens = torch.randint(0, TINY.vocab_size, (1, 14), generator=torch.Generator().manual_seed(2))
    tokens[0, 3] = TINY.vocab_size - 1                                           # a row of the padded last group
    with torch.no_grad():
        ref = q(tokens)                                                          # (1, 14, vocab) float32, exact weights
        full = fast(tokens)
        assert full.shape == ref.shape and full.dtype == torch.float32 and fast.cache_len == 14
        # the int8 activation's rounding: measured ~0.004-0.008 here; a wrong RoPE, GQA head or nibble gives > 0.3
        assert _rel(full, ref) < 0.03, _rel(full, ref)
        parts = [fast(tokens[:, :5], 0), fast(tokens[:, 5:9], 5)] + [fast(tokens[:, i:i + 1], i) for i in range(9, 14)]
        assert torch.equal(torch.cat(parts, dim=1), full)                        # same steps, same numbers
        last = fast(tokens, 0, last_only=True)
        assert last.shape == (1, 1, TINY.vocab_size) and torch.equal(last[0, -1], full[0, -1])


def test_c_source_is_a_package_file_without_block_sizes_of_its_own():
    source = c_source()
    assert "int course_step(" in source and "course_matvec(" in source
    assert "34" not in source.split("static int block_bytes")[1].split("}")[0]     # sizes come from GGML_BLOCKS


@needs_cc
def test_c_decode_step_is_a_decoder_with_the_shared_input_check():
    q = quantize_model(tiny_model(), "q4_0", matmul="dequant")
    step = CDecodeStep(q)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        full = step(tokens)                                                      # start_pos=0, like the Transformer
        assert step.cache_len == 4 and full.shape == (1, 4, TINY.vocab_size)
        assert torch.equal(step(tokens[:, 3:], 3), full[:, 3:])
        assert _rel(full, q(tokens)) < 0.1
    with pytest.raises(ValueError, match=r"CDecodeStep decodes one sequence"):
        step(tokens.repeat(2, 1))
    with pytest.raises(ValueError, match="start_pos=9 leaves a gap"):
        step(tokens[:, :1], 9)
    with pytest.raises(ValueError, match="for one sequence use tokens\\[None\\]"):
        step(tokens[0])


@needs_cc
def test_c_step_errors_are_the_torch_paths():
    q = quantize_model(tiny_model(), "q4_1", matmul="dequant")
    for kernel in ("c", "torch"):
        fast = FastQuantModel(q, kernel=kernel)
        assert fast.kernel == kernel and fast.device == torch.device("cpu") and fast.args is q.args
        fast(torch.tensor([[1, 2, 3]]), 0)
        with pytest.raises(ValueError, match=r"one sequence: tokens must be \(1, seq\), got \(2, 3\)"):
            fast(torch.zeros(2, 3, dtype=torch.long), 0)
        with pytest.raises(ValueError, match=r"start_pos=4 leaves a gap"):
            fast(torch.tensor([[1]]), 4)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            fast(torch.tensor([[TINY.vocab_size]]), 0)
        with pytest.raises(ValueError, match="exceeds max_seq_len=48"):
            fast(torch.zeros(1, 49, dtype=torch.long), 0)
        with pytest.raises(TypeError, match="integer tensor"):
            fast(torch.zeros(1, 3), 0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        FastQuantModel(q, kernel="cuda")


def test_no_compiler_gives_a_clear_error_and_auto_falls_back(monkeypatch):
    q = quantize_model(small_model(), "q4_1", matmul="dequant")
    monkeypatch.setattr(_c_step, "find_c_compiler", lambda: None)
    with pytest.raises(CCompilerError, match=r"no C compiler found.*install.*kernel='torch'"):
        FastQuantModel(q, kernel="c")
    assert isinstance(CCompilerError("x"), RuntimeError)
    fast = FastQuantModel(q)                                                     # "auto"
    assert fast.kernel == "torch"
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert _rel(fast(tokens), q(tokens)) < 0.03


@needs_cc
def test_c_step_builds_from_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(_c_step, "_C_LIBS", {})
    lib = build_c_step(("COURSE_TEST_CACHE",))
    files = list((tmp_path / "course_lib").glob("c_step-*.so"))
    assert len(files) == 1 and lib.course_simd() in (0, 1, 2)
    assert build_c_step(("COURSE_TEST_CACHE",)) is lib                           # loaded once per process
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))                       # $CC missing: falls back to cc/gcc
    assert find_c_compiler() is not None


@needs_cc
def test_c_step_on_smollm2_stays_close_to_float32_and_the_torch_path(smollm2, wiki_ids):
    _, model = smollm2
    qm = quantize_model(copy.deepcopy(model), "q4_1")
    c, lean = FastQuantModel(qm, kernel="c"), FastQuantModel(qm, kernel="torch")
    exact = set_matmul(copy.deepcopy(qm), "dequant")
    ids = wiki_ids[:64]
    with torch.no_grad():
        ref, got_c, got_torch = exact(ids[None]), c(ids[None]), lean(ids[None])
    err_c, err_torch = _rel(got_c, ref), _rel(got_torch, ref)
    print("relative logit error vs the dequantized model: C", round(err_c, 4), "torch", round(err_torch, 4))
    assert err_c < 0.05 and err_c < 4 * err_torch, (err_c, err_torch)           # int8 rounding ~2-3x bf16's
    r = compare_models(c, model, wiki_ids[:256], 128)
    r_torch = compare_models(lean, model, wiki_ids[:256], 128)
    print("KL, top-1 vs float32: C", r["kl"], r["top1"], "torch", r_torch["kl"], r_torch["top1"])
    # measured: C KL 0.0034, top-1 0.957; torch (bf16 activations) KL 0.0006, top-1 0.988
    assert r["kl"] < 0.01 and r["top1"] > 0.93 and r["kl"] < 10 * r_torch["kl"] + 1e-3, (r, r_torch)
    prefixes = []
    for start in (20, 60, 100):                                                  # 3 prompts, 32 greedy tokens
        prompt = wiki_ids[start:start + 12].tolist()
        ref_tokens = list(generate_tokens(model, prompt, 32))
        c_tokens = list(generate_tokens(c, prompt, 32))
        prefixes.append((matching_prefix(c_tokens, ref_tokens),
                         matching_prefix(list(generate_tokens(lean, prompt, 32)), ref_tokens)))
        with torch.no_grad():                                                    # teacher-forced along float32's tokens
            picks = c(torch.tensor([prompt + ref_tokens]), 0)[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert sum(a == b for a, b in zip(picks, ref_tokens)) >= 28, (start, picks, ref_tokens)
    print("matching greedy prefixes (C, torch) out of 32:", prefixes)
    assert sum(p[0] for p in prefixes) >= 24


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fast_quant_model_torch_kernel_still_matches(scheme):
    "The tests above run kernel='auto' (the C step where a compiler is found); the torch path, explicitly."
    q = quantize_model(small_model(False), scheme, "q8_0", matmul="dequant")
    fast = FastQuantModel(q, kernel="torch")
    assert fast.kernel == "torch" and fast.c_step is None
    tokens = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = q(tokens)
        assert _rel(fast(tokens), ref) < 0.03
        parts = [fast(tokens[:, :6], 0)] + [fast(tokens[:, i:i + 1], i) for i in range(6, 10)]
        assert _rel(torch.cat(parts, dim=1), ref) < 0.03
