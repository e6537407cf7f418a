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
    return save_quantized(quantize_model(Transformer(ModelArgs(**ARGS)).eval(), "q4_1", matmul="dequant"),
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


def test_folders_and_files_in_the_wrong_place_are_named(tmp_path, saved):
    from course_lib import load_hf_checkpoint, read_gguf
    (tmp_path / "x.gguf").mkdir()
    with pytest.raises(ValueError, match=r"x.gguf is a folder, not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match=r"is a folder; save_quantized writes a quantized model as one"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match=r"m.safetensors is a file; load_hf_checkpoint takes the folder"):
        load_hf_checkpoint(saved)
    hf = tmp_path / "hf"
    (hf / "model.safetensors").mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256, max_position_embeddings=32, rms_norm_eps=1e-5)))
    with pytest.raises(ValueError, match=r"model.safetensors is a folder; transformers reads model.safetensors as one file"):
        load_hf_checkpoint(hf)


def test_hf_sizes_are_checked_before_any_weight_is_read(tmp_path, monkeypatch):
    "The config's model, then the weight files themselves, against max_bytes: before safetensors reads a byte."
    import course_lib.weights as weights
    hf = tmp_path / "hf"
    hf.mkdir()
    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=256, max_position_embeddings=32,
                  rms_norm_eps=1e-5)
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2**20}))
    (hf / "model.safetensors").write_bytes(b"\0" * 600_000)     # the model itself needs about 445 kB
    monkeypatch.setattr("safetensors.safe_open", lambda *a, **k: pytest.fail("read a weight file"))
    with pytest.raises(ValueError, match=r"config.json: a Transformer with .*n_layers=1048576.*GiB, more than"):
        weights.load_hf_checkpoint(hf)
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the weight files hold 0.000559 GiB, more than the 0.000466 GiB allowed"):
        weights.load_hf_checkpoint(hf, max_bytes=500_000)


def test_meta_shards_are_not_merged_for_a_model_too_big(tmp_path, monkeypatch):
    import course_lib.weights as weights
    torch.save({"tok_embeddings.weight": torch.zeros(256, 32)}, tmp_path / "consolidated.00.pth")
    torch.save({"tok_embeddings.weight": torch.zeros(256, 32)}, tmp_path / "consolidated.01.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2**20, "n_heads": 4, "vocab_size": -1}))
    monkeypatch.setattr(weights, "merge_meta_shards", lambda shards: pytest.fail("merged the shards"))
    with pytest.raises(ValueError, match=r"n_layers=1048576.*GiB, more than"):
        weights.load_meta_checkpoint(tmp_path)
