"""Issue 14: small checkpoints in every format the course reads, mutated one thing at a time. Meta's folder
(params.json + consolidated.NN.pth, one and two shards), a Hugging Face folder (config.json + model.safetensors)
and chapter 08's quantized safetensors file: their JSON fields, tensor names, dtypes, shapes and offsets,
truncations and random bit flips.

Every case must end in a ValueError or TypeError within seconds and bounded memory, or load into a model whose
logits equal the original's: never a hang, a memory blow-up, another exception type, or a silently different
model. The cases run in one worker process under a memory limit and a per-case alarm, as in test_gguf_fuzz.py.

The mutations are written here with `json`, `struct` and `torch.save`, independently of course_lib's loaders.
A value that is valid but different (norm_eps 1e-4 instead of 1e-5) makes a different model on purpose, so
the JSON mutations use only values that no model could mean: zero, negative, absurdly large, wrong types, nan."""
import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

from course_lib.quant_model import quantize_model, save_quantized
from course_lib.weights import load_hf_checkpoint
from tests.fuzz_runner import assert_clear_error_or_same_model, assert_every_case_ended, run_worker
from tests.test_weights import bf16_hf, write_meta

BAD_INTS = [0, -1, 2**31, 2**62, 1.5, "64", True, [], {}, float("nan"), float("inf")]
BAD_FLOATS = [0, -1.0, "1e-5", True, [], float("nan"), float("inf"), -float("inf")]
BAD_BOOLS = ["yes", 2, [], {}]


def _json_cases(data: dict, ints, floats, bools, required, prefix: str) -> list:
    "(description, new dict) for each key: deleted when the loader must insist on it, then each bad value."
    cases = []
    for key in required:
        cases.append((f"{prefix}: no {key}", {k: v for k, v in data.items() if k != key}))
    for keys, values in ((ints, BAD_INTS), (floats, BAD_FLOATS), (bools, BAD_BOOLS)):
        for key in keys:
            cases += [(f"{prefix}: {key} = {v!r}", {**data, key: v}) for v in values]
    return cases


def _st_split(buf: bytes) -> tuple:
    "A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes."
    (n,) = struct.unpack_from("<Q", buf, 0)
    return json.loads(buf[8:8 + n]), buf[8 + n:]


def _st_join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _safetensors_cases(buf: bytes, rng: random.Random, prefix: str) -> list:
    "(description, new file bytes): header length, dtype, shape and offset edits, truncations, bit flips."
    header, data = _st_split(buf)
    names = sorted(k for k in header if k != "__metadata__")
    picks = rng.sample(names, 4)
    cases = [(f"{prefix}: header length {n}", struct.pack("<Q", n) + buf[8:]) for n in (0, 7, 2**40, len(buf))]
    for name in picks:
        info = header[name]
        for dtype in ("F16", "BF16", "I32", "F64", "BOOL", "U8"):
            if dtype != info["dtype"]:
                cases.append((f"{prefix}: {name} dtype {info['dtype']}->{dtype}",
                              _st_join({**header, name: {**info, "dtype": dtype}}, data)))
        shape = info["shape"]
        for new in (shape[::-1], [shape[0] + 1] + shape[1:], [shape[0] - 1] + shape[1:], [], shape + [1]):
            if new != shape:
                cases.append((f"{prefix}: {name} shape {shape}->{new}", _st_join({**header, name: {**info, "shape": new}}, data)))
        a, b = info["data_offsets"]
        for da in (-4, 4, 64):
            cases.append((f"{prefix}: {name} offsets +{da}",
                          _st_join({**header, name: {**info, "data_offsets": [a + da, b + da]}}, data)))
        other = header[names[(names.index(name) + 1) % len(names)]]
        cases.append((f"{prefix}: {name} points at another tensor's bytes",
                      _st_join({**header, name: {**info, "data_offsets": other["data_offsets"]}}, data)))
        cases.append((f"{prefix}: {name} removed", _st_join({k: v for k, v in header.items() if k != name}, data)))
        cases.append((f"{prefix}: {name} renamed", _st_join({**{k: v for k, v in header.items() if k != name},
                                                              name + ".x": info}, data)))
    n_header = 8 + struct.unpack_from("<Q", buf, 0)[0]
    for cut in (0, 4, 8, 40, n_header - 1, n_header, n_header + len(data) // 2, len(buf) - 1):
        cases.append((f"{prefix}: truncated to {cut} bytes", buf[:cut]))
    for _ in range(25):
        pos, bit = rng.randrange(8, n_header), rng.randrange(8)
        flipped = bytearray(buf)
        flipped[pos] ^= 1 << bit
        cases.append((f"{prefix}: bit {bit} of header byte {pos} flipped", bytes(flipped)))
    return cases


HF_INTS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
           "vocab_size", "max_position_embeddings", "head_dim"]
META_INTS = ["dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim", "max_seq_len"]
ARGS_INTS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"]


def _hf_cases(folder: Path, rng) -> list:
    config = json.loads((folder / "config.json").read_text())
    rope = config["rope_parameters"]
    cases = [("config.json", c) for c in _json_cases(
        config, HF_INTS, ["rms_norm_eps"], ["tie_word_embeddings", "attention_bias", "mlp_bias"],
        # an absent rope_theta is transformers' default (10000): a different model, as it is in transformers
        ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
         "max_position_embeddings", "rms_norm_eps", "num_key_value_heads"], "config.json")]
    cases += [("config.json", (f"config.json: rope_theta = {v!r}", {**config, "rope_parameters": {**rope, "rope_theta": v}}))
              for v in BAD_FLOATS]
    cases += [("config.json", (f"config.json: rope_parameters = {v!r}", {**config, "rope_parameters": v}))
              for v in ("default", [1], 5000.0)]
    cases += [("config.json", (f"config.json: {k} = {v!r}", {**config, k: v}))
              for k, v in (("model_type", "mistral"), ("hidden_act", "gelu"), ("model_type", 3))]
    cases += [("config.json", ("config.json: a list", [config])), ("config.json", ("config.json: not JSON", "{"))]
    st = (folder / "model.safetensors").read_bytes()
    cases += [("model.safetensors", c) for c in _safetensors_cases(st, rng, "model.safetensors")]
    return cases


def _meta_cases(folder: Path, rng) -> list:
    params = json.loads((folder / "params.json").read_text())
    cases = [("params.json", c) for c in _json_cases(
        params, META_INTS, ["norm_eps", "rope_theta", "ffn_dim_multiplier"], [],
        # an absent norm_eps or rope_theta takes Meta's defaults: a model of a different kind, not a corruption
        ["dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"], "params.json")]
    sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
    edits = {"wq rows cut": ("layers.0.attention.wq.weight", lambda t: t[:-2]),
             "wk transposed": ("layers.1.attention.wk.weight", lambda t: t.T.contiguous()),
             "w2 as int32": ("layers.0.feed_forward.w2.weight", lambda t: t.view(torch.int16).to(torch.int32)),
             "w1 as bool": ("layers.1.feed_forward.w1.weight", lambda t: t != 0),
             "norm as complex": ("norm.weight", lambda t: t.float().to(torch.complex64)),
             "norm as int8 bytes": ("norm.weight", lambda t: t.view(torch.int8)),
             "output flattened": ("output.weight", lambda t: t.flatten()),
             "embedding 0-d": ("tok_embeddings.weight", lambda t: t[0, 0]),
             "embedding 3-d": ("tok_embeddings.weight", lambda t: t[None]),
             "embedding a view of a bigger storage": ("tok_embeddings.weight", lambda t: torch.cat([t, t])[: len(t)])}
    for what, (key, edit) in edits.items():
        cases.append(("consolidated.00.pth", (f"pth: {what}", {**sd, key: edit(sd[key])})))
    for key in ("layers.1.ffn_norm.weight", "output.weight", "tok_embeddings.weight"):
        cases.append(("consolidated.00.pth", (f"pth: no {key}", {k: v for k, v in sd.items() if k != key})))
    cases.append(("consolidated.00.pth", ("pth: an extra layer", {**sd, "layers.2.attention.wq.weight": sd["layers.0.attention.wq.weight"]})))
    cases.append(("consolidated.00.pth", ("pth: a list, not a dict", list(sd.values()))))
    cases.append(("consolidated.00.pth", ("pth: a list value", {**sd, "norm.weight": [1.0, 2.0]})))
    raw = (folder / "consolidated.00.pth").read_bytes()
    for cut in (0, 10, len(raw) // 3, len(raw) - 30, len(raw) - 1):
        cases.append(("consolidated.00.pth", (f"pth: truncated to {cut} bytes", raw[:cut])))
    start = raw.index(b"data.pkl") + len(b"data.pkl")     # the pickle that names, types and shapes the tensors
    end = raw.index(b"PK", start)
    for _ in range(25):
        pos, bit = rng.randrange(start, end), rng.randrange(8)
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << bit
        cases.append(("consolidated.00.pth", (f"pth: bit {bit} of pickle byte {pos} flipped", bytes(flipped))))
    return cases


def _quant_cases(path: Path, rng) -> list:
    buf = path.read_bytes()
    header, data = _st_split(buf)
    meta = header["__metadata__"]
    args, config = json.loads(meta["model_args"]), json.loads(meta["quant_config"])

    def with_meta(**changes):
        return _st_join({**header, "__metadata__": {**meta, **changes}}, data)
    cases = [(what, with_meta(model_args=json.dumps(a))) for what, a in _json_cases(
        args, ARGS_INTS, ["norm_eps", "rope_theta"], ["tie_embeddings"], list(args), "model_args")]
    cases += [(f"quant_config {c}", with_meta(quant_config=json.dumps(c)))
              for c in ({**config, "scheme": "q5_0"}, {**config, "output_scheme": 3}, {}, [config])]
    cases += [("format_version 2", with_meta(format_version="2")), ("format gguf", with_meta(format="gguf")),
              ("model_args not JSON", with_meta(model_args="{")), ("schemes {}", with_meta(schemes="{}")),
              ("schemes changed", with_meta(schemes=meta["schemes"].replace('"q4_0"', '"q8_0"', 1))),
              ("no metadata", _st_join({k: v for k, v in header.items() if k != "__metadata__"}, data))]
    cases += _safetensors_cases(buf, rng, "quantized")
    return [("model.q4_0.safetensors", c) for c in cases]


WORKER = r'''
import json, resource, signal, sys, torch
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from course_lib.weights import load_hf_checkpoint, load_meta_checkpoint
from course_lib.quant_model import load_quantized
work, cases = Path(sys.argv[1]), json.load(open(sys.argv[2]))
prompt = torch.tensor([[3, 17, 100, 42, 9, 64, 1]])
LOAD = {"hf": load_hf_checkpoint, "meta": load_meta_checkpoint, "meta2": load_meta_checkpoint,
        "quant": lambda p: load_quantized(p / "model.q4_0.safetensors", matmul="dequant")}
def logits(kind, folder):
    with torch.no_grad():
        return LOAD[kind](folder)(prompt)
reference = {kind: logits(kind, work / kind) for kind in LOAD}
def timeout(*_): raise TimeoutError("more than 30 s")
signal.signal(signal.SIGALRM, timeout)
for i, (kind, folder) in enumerate(cases):
    print(json.dumps({"start": i}), flush=True)
    signal.alarm(30)
    try:
        result = "same" if torch.equal(logits(kind, Path(folder)), reference[kind]) else "DIFFERENT MODEL"
    except (ValueError, TypeError) as e:
        result = f"{type(e).__name__}: {str(e)[:300]}"
    except BaseException as e:
        result = f"UNEXPECTED {type(e).__name__}: {str(e)[:300]}"
    signal.alarm(0)
    print(json.dumps({"case": i, "result": result}), flush=True)
'''


def _write(target: Path, content) -> None:
    if isinstance(content, bytes):
        target.write_bytes(content)
    elif isinstance(content, str):
        target.write_text(content)
    elif target.suffix == ".json":
        target.write_text(json.dumps(content))              # NaN and Infinity as Python's json writes them
    else:
        torch.save(content, target)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    work = tmp_path_factory.mktemp("checkpoints")
    rng = random.Random(14)
    hf = bf16_hf()                                            # bf16-exact weights: Meta's files are bf16
    hf.save_pretrained(work / "hf", safe_serialization=True)
    write_meta(work / "meta", hf, {"multiple_of": 32, "n_kv_heads": 2, "rope_theta": 5000.0, "hidden_dim": 96})
    write_meta(work / "meta2", hf, {"multiple_of": 32, "n_kv_heads": 2, "rope_theta": 5000.0, "hidden_dim": 96}, n_shards=2)
    (work / "quant").mkdir()
    save_quantized(quantize_model(load_hf_checkpoint(work / "hf"), "q4_0"), work / "quant" / "model.q4_0.safetensors")
    plans = [("hf", c) for c in _hf_cases(work / "hf", rng)] + [("meta", c) for c in _meta_cases(work / "meta", rng)]
    plans += [("quant", c) for c in _quant_cases(work / "quant" / "model.q4_0.safetensors", rng)]
    sd1 = torch.load(work / "meta2" / "consolidated.01.pth", weights_only=True)
    plans += [("meta2", ("consolidated.01.pth", (f"shard 1: {what}", {**sd1, key: value})))
              for what, key, value in (
                  ("wq has one row less", "layers.0.attention.wq.weight", sd1["layers.0.attention.wq.weight"][1:]),
                  ("a different norm", "norm.weight", sd1["norm.weight"] + 1),
                  ("w2 as float16", "layers.1.feed_forward.w2.weight", sd1["layers.1.feed_forward.w2.weight"].half()))]
    plans += [("meta2", ("consolidated.02.pth", ("a third shard", sd1)))]
    cases, descriptions = [], []
    for i, (kind, (file_name, (what, content))) in enumerate(plans):
        folder = work / f"case{i:04d}"
        shutil.copytree(work / kind, folder)
        _write(folder / file_name, content)
        cases.append((kind, str(folder)))
        descriptions.append(f"{kind}: {what}")
    (work / "cases.json").write_text(json.dumps(cases))
    results, started, run = run_worker(WORKER, work, work / "cases.json")
    return descriptions, results, started, run


def test_every_case_ran_to_its_end(fuzzed):
    assert_every_case_ended(*fuzzed, at_least=400)


def test_no_case_loads_a_different_model_or_fails_badly(fuzzed):
    assert_clear_error_or_same_model(*fuzzed[:2])


@pytest.mark.parametrize("needle, message", [
    ("hf: config.json: num_attention_heads = 0", "config.json: the config's num_attention_heads must be a positive integer, got 0"),
    ("hf: config.json: hidden_size = '64'", "the config's hidden_size must be a positive integer, got '64'"),
    ("hf: config.json: vocab_size = 2147483648", "GiB, more than"),
    ("hf: config.json: tie_word_embeddings = 'yes'", "tie_word_embeddings must be true or false"),
    ("meta: params.json: n_layers = 2147483648", "GiB, more than"),
    ("meta: params.json: dim = '64'", "ModelArgs.dim must be a positive int, got '64'"),
    ("meta: pth: embedding 0-d", "it must be (vocab_size, dim)"),
    ("meta: pth: w2 as int32", "int32"),
    ("meta2: shard 1: a different norm", "they differ"),
    ("quant: model_args: no norm_eps", "norm_eps"),
])
def test_the_errors_name_the_field(fuzzed, needle, message):
    descriptions, results, _, _ = fuzzed
    hits = [results[i] for i, what in enumerate(descriptions) if what == needle]
    assert hits and message in hits[0], (needle, hits)
