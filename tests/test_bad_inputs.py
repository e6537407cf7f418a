"""Issue 14: bad model files and arguments get one ValueError or TypeError naming the path and the problem,
before any large allocation."""
import json

import pytest
import torch

from course_lib import (ModelArgs, Transformer, generate, load_gguf_model, load_quantized, quantize_model,
                        save_quantized)
from course_lib.model import guard_model_size, model_bytes

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=32)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return save_quantized(quantize_model(Transformer(ModelArgs(**ARGS)).eval(), "q4_1", backend="dequant"),
                          tmp_path / "m.safetensors")


def _rewrite(path, **meta_changes):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    save_file(tensors, str(path), metadata=meta)


def test_load_quantized_names_the_problem(saved):
    assert load_quantized(saved).args.dim == 64
    args = json.loads(__import__("safetensors").safe_open(str(saved), "pt").metadata()["model_args"])
    _rewrite(saved, model_args=json.dumps({**args, "max_seq_len": 2**40}))
    with pytest.raises(ValueError, match=r"m.safetensors: its metadata .*GiB, more than"):
        load_quantized(saved)
    _rewrite(saved, model_args=json.dumps({k: v for k, v in args.items() if k != "dim"}) + "}")
    with pytest.raises(ValueError, match=r"m.safetensors: its metadata .*JSONDecodeError"):
        load_quantized(saved)
    _rewrite(saved, model_args=json.dumps(args), quant_config=None)
    with pytest.raises(ValueError, match=r"m.safetensors: its metadata .*KeyError: 'quant_config'"):
        load_quantized(saved)
    data = saved.read_bytes()
    saved.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"m.safetensors is truncated or not a safetensors file"):
        load_quantized(saved)
    with pytest.raises(FileNotFoundError, match="quantized model not found: .*nope.safetensors"):
        load_quantized(saved.parent / "nope.safetensors")


def test_model_size_is_checked_before_building():
    big = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=2**31)
    with pytest.raises(ValueError, match=r"max_seq_len=2147483648 needs about .* GiB, more than the 1 GiB allowed"):
        guard_model_size(big, max_bytes=2**30)
    small = ModelArgs(**ARGS)
    guard_model_size(small, max_bytes=model_bytes(small))        # exactly enough: fine
    with pytest.raises(ValueError, match="more than"):
        guard_model_size(small, max_bytes=model_bytes(small) - 1)
    with torch.device("meta"):
        guard_model_size(big)                                      # shapes only: nothing to allocate


def test_generate_checks_its_tokenizer():
    model = Transformer(ModelArgs(**ARGS)).eval()
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer with encode, decode and eos_id .*got NoneType"):
        generate(model, None, "hello", max_new_tokens=2)


def test_gguf_loader_takes_max_bytes(tmp_path):
    from course_lib import fetch_smollm2
    with pytest.raises(ValueError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf: a Transformer .* more than the 0.0977 GiB"):
        load_gguf_model(fetch_smollm2(progress=False), max_bytes=100 * 2**20)
