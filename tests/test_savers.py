"""Issue 14: both savers (save_quantized, export_gguf) write a temporary file beside the target, fsync it and
rename it into place: a kill partway or a full disk leaves the old file intact, an existing file is replaced
only with overwrite=True, and new files get the mode the umask gives."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib import ModelArgs, Transformer, export_gguf, load_quantized, quantize_model, read_gguf, save_quantized

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=32)
SAVERS = {"save_quantized": ("m.safetensors", lambda m, p, **kw: save_quantized(m, p, **kw)),
          "export_gguf": ("m.gguf", lambda m, p, **kw: export_gguf(m, p, **kw))}


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return quantize_model(Transformer(ModelArgs(**ARGS)).eval(), "q4_1", matmul="dequant")


@pytest.mark.parametrize("saver", SAVERS)
def test_an_existing_file_is_replaced_only_when_asked(tmp_path, saver):
    name, save = SAVERS[saver]
    path = tmp_path / name
    save(_model(0), path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"{name} exists; pass overwrite=True to replace it"):
        save(_model(1), path)
    assert path.read_bytes() == before
    save(_model(1), path, overwrite=True)
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]               # no temporary file left
    with pytest.raises(ValueError, match="the folder .*missing does not exist"):
        save(_model(0), tmp_path / "missing" / name)


@pytest.mark.parametrize("saver", SAVERS)
def test_new_files_follow_the_umask(tmp_path, saver):
    name, save = SAVERS[saver]
    old = os.umask(0o027)
    try:
        save(_model(), tmp_path / name)
    finally:
        os.umask(old)
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o640


CHILD = r'''
import os, resource, signal, sys, torch
from course_lib import ModelArgs, Transformer, export_gguf, quantize_model, save_quantized
saver, path, limit, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(1)
model = quantize_model(Transformer(ModelArgs(**{args})).eval(), "q4_1", matmul="dequant")
signal.signal(signal.SIGXFSZ, signal.SIG_DFL if how == "kill" else signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))   # the write stops partway: killed, or a full disk
try:
    (save_quantized if saver == "save_quantized" else export_gguf)(model, path, overwrite=True)
except OSError as e:
    print("OSError", e.errno, e)
'''


@pytest.mark.parametrize("how", ["kill", "full disk"])
@pytest.mark.parametrize("saver", SAVERS)
def test_a_write_stopped_partway_leaves_the_old_file(tmp_path, saver, how):
    name, save = SAVERS[saver]
    path = tmp_path / name
    save(_model(0), path)
    before = path.read_bytes()
    run = subprocess.run([sys.executable, "-c", CHILD.replace("{args}", repr(ARGS)), saver, str(path),
                          str(len(before) // 2), how], capture_output=True, text=True, timeout=120)
    if how == "kill":
        assert run.returncode == -signal.SIGXFSZ, run.stderr[-1000:]
    else:
        assert run.returncode == 0 and run.stdout.startswith("OSError"), (run.stdout, run.stderr[-1000:])
    assert path.read_bytes() == before                                   # the old model, byte for byte
    (load_quantized(path) if saver == "save_quantized" else read_gguf(path))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != name]
    if how == "full disk":
        assert leftovers == []                                           # the failed write cleaned up after itself
    else:                                     # a kill cannot: hidden partial files (safetensors keeps its own too)
        assert any(p.startswith(f".{name}.") and p.endswith(".partial") for p in leftovers)
        assert all(p.startswith(".") for p in leftovers)


def test_export_gguf_reads_metadata_from_through_the_checked_reader(tmp_path):
    "A corrupt metadata_from is a ValueError naming it (it was an IndexError from gguf's reader), and no file appears."
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (2**40).to_bytes(8, "little"))
    with pytest.raises(ValueError, match=r"bad.gguf"):
        export_gguf(_model(), tmp_path / "m.gguf", metadata_from=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
