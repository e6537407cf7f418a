"""Issue 14: the real SmolLM2 GGUF, mutated one field at a time (lengths, counts, offsets, types, dimensions,
hyperparameters, special ids, random bit flips in the tensor table). Every case must end in a ValueError or
TypeError within seconds and bounded memory, or load into a model whose logits equal the original's: never a
hang, a memory blow-up, another exception type, or a silently different model.

The mutations are located by a small independent walk of the GGUF header written here with `struct` (not
with course_lib's reader). The cases run in one worker process under a memory limit and a time limit, so a
case that hangs or explodes fails the test instead of the test run."""
import json
import random
import struct

import pytest

from course_lib.weights import fetch_smollm2
from tests.fuzz_runner import assert_clear_error_or_same_model, assert_every_case_ended, run_worker

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _walk(buf: bytes) -> dict:
    "Byte positions of the fields to mutate, from the GGUF spec."
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
    fields = {"tensor_count": (pos, "<Q"), "kv_count": (pos + 8, "<Q")}
    pos += 16

    def string(pos):
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n

    def value(pos, vtype, key):
        if vtype in SCALAR:
            fields[f"{key}=value"] = (pos, SCALAR[vtype])
            return pos + struct.calcsize(SCALAR[vtype])
        if vtype == 8:
            fields[f"{key}=string length"] = (pos, "<Q")
            return string(pos)
        etype, n = struct.unpack_from("<IQ", buf, pos)
        fields[f"{key}=array length"] = (pos + 4, "<Q")
        fields[f"{key}=array type"] = (pos, "<I")
        pos += 12
        for _ in range(n):
            pos = value(pos, etype, key + "[]") if etype in (8, 9) else pos + struct.calcsize(SCALAR[etype])
        return pos

    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8:pos + 8 + klen].decode()
        fields[f"{key}=key length"] = (pos, "<Q")
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", buf, pos)
        fields[f"{key}=value type"] = (pos, "<I")
        pos = value(pos + 4, vtype, key)
    tensors = []
    for i in range(n_tensors):
        name_at = pos
        pos = string(pos)
        name = buf[name_at + 8:pos].decode()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        info = {"name": name, "name_at": name_at, "n_dims": pos, "dims": [pos + 4 + 8 * d for d in range(n_dims)]}
        pos += 4 + 8 * n_dims
        info["type"], info["offset"] = pos, pos + 4
        info["type_value"], info["offset_value"] = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        tensors.append(info)
    return {"fields": fields, "tensors": tensors, "end": pos}


def _cases(buf: bytes) -> list:
    "(description, byte position, new bytes)."
    w = _walk(buf)
    f, cases = w["fields"], []
    pack = lambda fmt, v: struct.pack(fmt, v)
    for name in ("tensor_count", "kv_count"):
        pos, fmt = f[name]
        (old,) = struct.unpack_from(fmt, buf, pos)
        cases += [(f"{name}={v}", pos, pack(fmt, v)) for v in (old + 1, old - 1, 2**40)]
    for key, (pos, fmt) in f.items():
        if "=" not in key or key.count("[]"):
            continue
        name, what = key.split("=")
        if what in ("string length", "array length", "key length"):
            cases.append((f"{name}: {what} 2**40", pos, pack(fmt, 2**40)))
        elif what == "array type":
            cases.append((f"{name}: array type 99", pos, pack(fmt, 99)))
        elif what == "value type":
            cases.append((f"{name}: value type 13", pos, pack(fmt, 13)))
        elif what == "value" and fmt in ("<I", "<Q", "<i", "<q"):
            big = 2**31 - 1 if fmt in ("<I", "<i") else 2**40
            cases += [(f"{name} = 0", pos, pack(fmt, 0)), (f"{name} = {big}", pos, pack(fmt, big))]
            if name.startswith("tokenizer.ggml.") and name.endswith("_token_id"):
                cases.append((f"{name} = 49152 (past the vocabulary)", pos, pack(fmt, 49152)))
        elif what == "value" and fmt == "<f":
            cases += [(f"{name} = {v}", pos, pack(fmt, v)) for v in (float("inf"), float("nan"), 0.0, -1.0)]
    tensors = w["tensors"]
    picked = tensors[:2] + tensors[130:132] + tensors[-2:]
    for i, t in zip([0, 1, 130, 131, len(tensors) - 2, len(tensors) - 1], picked):
        n = t["name"]
        other = tensors[(i + 5) % len(tensors)]["offset_value"]
        cases += [(f"{n}: n_dims 0", t["n_dims"], pack("<I", 0)), (f"{n}: n_dims 5", t["n_dims"], pack("<I", 5)),
                  (f"{n}: dim0 doubled", t["dims"][0], pack("<Q", struct.unpack_from("<Q", buf, t["dims"][0])[0] * 2)),
                  (f"{n}: dim0 2**40", t["dims"][0], pack("<Q", 2**40)),
                  (f"{n}: offset +1", t["offset"], pack("<Q", t["offset_value"] + 1)),
                  (f"{n}: offset +32", t["offset"], pack("<Q", t["offset_value"] + 32)),
                  (f"{n}: offset +64", t["offset"], pack("<Q", t["offset_value"] + 64)),
                  (f"{n}: offset of another tensor", t["offset"], pack("<Q", other)),
                  (f"{n}: offset 2**60", t["offset"], pack("<Q", 2**60)),
                  (f"{n}: type 99", t["type"], pack("<I", 99))]
        swaps = {3: (2, "Q4_1->Q4_0"), 8: (30, "Q8_0->BF16"), 0: (1, "F32->F16")}
        if t["type_value"] in swaps:
            new, what = swaps[t["type_value"]]
            cases.append((f"{n}: type {what}", t["type"], pack("<I", new)))
    rng = random.Random(14)
    start = tensors[0]["name_at"]
    for _ in range(40):                                   # random single-bit flips in the tensor table
        pos = rng.randrange(start, w["end"])
        bit = rng.randrange(8)
        cases.append((f"bit {bit} of byte {pos} (tensor table) flipped", pos, bytes([buf[pos] ^ (1 << bit)])))
    return cases


WORKER = r'''
import json, resource, signal, shutil, sys, torch
from pathlib import Path
src, work, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.load(open(sys.argv[3]))
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from course_lib import load_gguf
path = work / "model.gguf"
shutil.copyfile(src, path)
prompt = torch.tensor([[504, 3575, 282, 4649, 314]])
def logits():
    model, tok = load_gguf(path)
    with torch.no_grad():
        return model(prompt)
reference = logits()
def timeout(*_): raise TimeoutError("more than 60 s")
signal.signal(signal.SIGALRM, timeout)
with open(path, "r+b") as f:
    for i, (what, pos, new) in enumerate(cases):
        new = bytes.fromhex(new)
        f.seek(pos); old = f.read(len(new)); f.seek(pos); f.write(new); f.flush()
        print(json.dumps({"start": i}), flush=True)
        signal.alarm(60)
        try:
            out = logits()
            result = "same" if torch.equal(out, reference) else "DIFFERENT MODEL"
        except (ValueError, TypeError) as e:
            result = f"{type(e).__name__}: {str(e)[:200]}"
        except BaseException as e:
            result = f"UNEXPECTED {type(e).__name__}: {str(e)[:200]}"
        signal.alarm(0)
        f.seek(pos); f.write(old); f.flush()
        print(json.dumps({"case": i, "result": result}), flush=True)
'''


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    src = fetch_smollm2(progress=False)
    buf = src.read_bytes()[:4 << 20]                      # the header lies in the first few MB
    cases = _cases(buf)
    work = tmp_path_factory.mktemp("fuzz")
    (work / "cases.json").write_text(json.dumps([(w, p, b.hex()) for w, p, b in cases]))
    results, started, run = run_worker(WORKER, src, work, work / "cases.json")
    return [what for what, _, _ in cases], results, started, run


def test_every_case_ran_to_its_end(fuzzed):
    assert_every_case_ended(*fuzzed, at_least=200)


def test_no_case_loads_a_different_model_or_fails_badly(fuzzed):
    assert_clear_error_or_same_model(*fuzzed[:2])


@pytest.mark.parametrize("needle, message", [
    ("tokenizer.ggml.token_type: array length 2**40", "claims 1099511627776 items"),
    ("llama.context_length = 2147483647", "GiB, more than"),
    ("llama.feed_forward_length = 2147483647", "GiB, more than"),
    ("llama.block_count = 2147483647", "GiB, more than"),
    ("llama.attention.head_count = 0", "'llama.attention.head_count' is 0; it must be a positive integer"),
    ("llama.attention.layer_norm_rms_epsilon = inf", "must be a positive finite number"),
    ("llama.rope.freq_base = inf", "must be a positive finite number"),
    ("tokenizer.ggml.eos_token_id = 49152 (past the vocabulary)", "not an id of the 49152-token vocabulary"),
    ("blk.0.attn_norm.weight: offset +32", "has data offset"),
    ("token_embd.weight: type Q8_0->BF16", "has data offset"),
    ("output_norm.weight: type F32->F16", "bytes follow the last tensor's data"),
])
def test_the_cases_of_the_issue_name_the_field(fuzzed, needle, message):
    descriptions, results, _, _ = fuzzed
    hits = [results[i] for i, what in enumerate(descriptions) if what == needle]
    assert hits and message in hits[0], (needle, hits)
