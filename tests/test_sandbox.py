"""course_lib.sandbox (and the grader's calls into it): the message format (never pickle, sizes checked first) and the sandboxed process
(exceptions, exits, crashes, time, output, forks, in-place edits, and what it can and cannot see)."""
import json
import math
import os
import struct

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import sandbox as sb
from course_lib.grading import SubmissionExit, UnsendableResult, load_submission_in
from course_lib.sandbox import Sandbox, SandboxStopped, WireError, decode, encode, pack, read_message


def _round_trip(value, shared=None, resolve=None):
    tree, buffers = encode(value, shared)
    stream = bytearray(pack({"v": tree}, buffers))
    def read_exact(n):
        out = bytes(stream[:n]); del stream[:n]; return out
    header, buffers = read_message(read_exact)
    assert not stream
    return decode(header["v"], buffers, resolve)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int8, torch.uint8, torch.bool])
def test_tensors_cross_bit_for_bit(dtype):
    x = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    back = _round_trip(x)
    assert back.dtype == dtype and back.shape == (3, 5) and torch.equal(back, x)
    assert _round_trip(torch.empty(0, 4, dtype=dtype)).shape == (0, 4)
    assert torch.equal(_round_trip(torch.tensor(7, dtype=dtype)), torch.tensor(7, dtype=dtype))


def test_plain_values_keep_their_types():
    value = {"ints": [1, -2, 2**70], "t": (1, "a", None, True), "f": [0.5, math.inf, -math.inf],
             "a": np.arange(6, dtype=np.int16).reshape(2, 3), "s": np.float32(1.5), "nested": {"x": [[1]]}}
    back = _round_trip(value)
    assert back["ints"] == [1, -2, 2**70] and back["t"] == (1, "a", None, True) and back["f"] == [0.5, math.inf, -math.inf]
    assert back["a"].dtype == np.int16 and np.array_equal(back["a"], value["a"])
    assert type(back["s"]) is np.float32 and back["nested"] == {"x": [[1]]}
    assert math.isnan(_round_trip(math.nan))
    assert _round_trip(torch.arange(3)[::2]).tolist() == [0, 2]                 # a strided view: its values
    model = object()
    assert _round_trip([model], shared={id(model): "m"}, resolve=lambda name: (name, "resolved")) == [("m", "resolved")]


@pytest.mark.parametrize("value, problem", [(object(), "a object cannot be sent"), ({1: 2}, "a dict cannot be sent"),
                                            (torch.zeros(2, dtype=torch.complex64), "complex64"),
                                            (np.zeros(2, dtype=np.complex64), "complex64"),
                                            (json.loads("[" * 40 + "]" * 40), "nested more than 32")])
def test_values_that_cannot_cross_are_refused(value, problem):
    with pytest.raises(WireError, match=problem):
        encode(value)


def _reader(data: bytes):
    stream = bytearray(data)
    def read_exact(n):
        if len(stream) < n:
            raise EOFError
        out = bytes(stream[:n]); del stream[:n]; return out
    return read_exact


@pytest.mark.parametrize("message, problem", [
    (struct.pack("<4sIQ", b"PKL!", 2, 0) + b"{}", "starts with"),
    (struct.pack("<4sIQ", b"CLW1", 2**31, 0), "over the limit"),
    (struct.pack("<4sIQ", b"CLW1", 2, 2**40), "over the limit"),
    (struct.pack("<4sIQ", b"CLW1", 5, 0) + b"{nope", "not JSON"),
    (struct.pack("<4sIQ", b"CLW1", 2, 0) + b"{}", "do not add up"),
    (struct.pack("<4sIQ", b"CLW1", 16, 3) + b'{"$sizes": [2]} ' + b"abc", "do not add up"),
])
def test_malformed_messages_are_refused_before_reading_their_data(message, problem):
    with pytest.raises(WireError, match=problem):
        read_message(_reader(message))


@pytest.mark.parametrize("tree, buffers, problem", [
    ({"$tensor": ["float32", [1000, 1000], 0]}, [b"1234"], "4 bytes for a shape that needs 4000000"),
    ({"$tensor": ["object", [1], 0]}, [b"1234"], "unknown dtype"),
    ({"$tensor": ["float32", [-1], 0]}, [b""], "bad shape"),
    ({"$tensor": ["float32", [1], 3]}, [b"1234"], "no buffer 3"),
    ({"$pickle": "gASV"}, [], "unknown value"),
    ({"$shared": "model"}, [], "unknown value"),                 # no resolver: shared names are not accepted
])
def test_malformed_values_are_refused(tree, buffers, problem):
    with pytest.raises(WireError, match=problem):
        decode(tree, buffers)


# -- the sandboxed process

SOURCE = '''
import os, sys, time, torch
class Oops(ValueError):
    pass
def add_one(x):
    x.add_(1)
    return x.sum().item()
def raise_custom(): raise Oops("custom")
def raise_unicode(): b"\\xff".decode()
def leave(): sys.exit(4)
def crash():
    import ctypes
    ctypes.string_at(0)
def spin(): 
    while True: pass
def chatty(): print("hello\\x1b[31m from the submission"); return 1
def unsendable(): return object()
def forked():
    if os.fork() == 0:
        return "the copy"                 # a forked copy answering would scramble the replies
    os.wait()
    return "the worker"
def identity(): return os.getpid(), os.getppid(), os.environ.get("COURSE_TEST_SECRET"), os.getcwd()
def scribble():
    for fd in range(3, 64):                   # whichever is the reply pipe: write garbage to it
        try:
            os.write(fd, b"not a message at all........................")
        except OSError:
            pass
    return 1
'''
NAMES = ["add_one", "raise_custom", "raise_unicode", "leave", "crash", "spin", "chatty", "unsendable", "forked",
         "identity", "scribble", "missing"]


@pytest.fixture
def box():
    with Sandbox(timeout=20, memory_mb=2048) as box:
        yield box


def test_functions_run_in_the_sandbox_and_answer_with_data(box, monkeypatch):
    sub = load_submission_in(box, SOURCE, "s.py", NAMES)
    assert sub.names["add_one"] == "function" and sub.get("missing") is None
    x = torch.zeros(3)
    assert sub.get("add_one")(x) == 3.0 and x.tolist() == [1.0, 1.0, 1.0]       # the in-place edit came back
    with pytest.raises(ValueError, match="custom") as e:
        sub.get("raise_custom")()
    assert e.value.remote_type == "Oops"
    with pytest.raises(Exception) as e:
        sub.get("raise_unicode")()
    assert e.value.remote_type == "UnicodeDecodeError"
    with pytest.raises(SubmissionExit) as e:                                     # never a SystemExit here
        sub.get("leave")()
    assert e.value.code == 4
    with pytest.raises(UnsendableResult, match="a object cannot be sent"):
        sub.get("unsendable")()
    assert sub.get("forked")() == "the worker" and sub.get("forked")() == "the worker"
    assert sub.get("chatty")() == 1
    assert box.output.last_line() == "hello?[31m from the submission"


def test_the_sandbox_sees_none_of_the_graders_processes_or_environment(monkeypatch):
    monkeypatch.setenv("COURSE_TEST_SECRET", "s3cret")
    with Sandbox(timeout=20) as box:
        pid, ppid, secret, cwd = load_submission_in(box, SOURCE, "s.py", ["identity"]).get("identity")()
        if "signals" not in box.lost:
            assert pid == 1 and ppid == 0                        # PID 1 of its own namespace
        assert secret is None and cwd == box._work


@pytest.mark.parametrize("name, reason", [("crash", "killed by SIGSEGV"), ("spin", r"time limit exceeded \(3 s\)"),
                                          ("scribble", "broke the protocol")])
def test_a_process_that_stops_answering_is_stopped_with_the_reason(name, reason):
    with Sandbox(timeout=3) as box:
        sub = load_submission_in(box, SOURCE, "s.py", NAMES)
        with pytest.raises(SandboxStopped, match=reason):
            sub.get(name)()
        assert box._proc is None                                  # closed: nothing left running


def test_hidden_files_and_folders_read_as_empty():
    tmp_path = Path(tempfile.mkdtemp())           # readable by anyone: only the hiding can stop the reads
    tmp_path.chmod(0o755)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "answers.txt").write_text("42")
    (tmp_path / "key.txt").write_text("secret")
    src = f"import os\ndef look(): return os.listdir({str(tmp_path / 'folder')!r}), open({str(tmp_path / 'key.txt')!r}).read()"
    with Sandbox(timeout=20, hide=[tmp_path / "folder", tmp_path / "key.txt"]) as box:
        if "hidden" in box.lost:
            pytest.skip(box.lost["hidden"])
        assert load_submission_in(box, src, "s.py", ["look"]).get("look")() == ([], "")


def test_the_supervisor_starts_with_the_standard_library_only():
    import subprocess
    import sys
    code = (f"import runpy, sys; runpy.run_path({sb.__file__!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


PROBE = '''
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("sb", sys.argv[1]); sb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sb)
root = sys.argv[2]
sb._enter_namespaces(False)                       # not root: a user namespace that maps only this uid
sb._build_file_system({"hide": [root + "/hidden"], "readable": [], "work": root + "/work", "work_mb": 8}, False)
if os.fork() == 0:
    sb._mount("proc", "/proc", "proc", sb._MS_NOSUID | sb._MS_NODEV | sb._MS_NOEXEC)
    os.execv(sys.executable, [sys.executable, "-c", """
import os, socket, sys
root = sys.argv[1]
out = [os.getpid(), os.getppid(), os.listdir(root + '/hidden')]
for attempt in (lambda: open(root + '/outside', 'w'), lambda: socket.create_connection(('127.0.0.1', 9), 1)):
    try: attempt(); out.append('ok')
    except OSError as e: out.append(e.strerror)
open(root + '/work/mine', 'w').write('x')
out.append([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])
print(out)
""", root])
os.wait()
'''


def test_the_user_namespace_path_as_an_unprivileged_user():
    "CI runs as root; this runs the layers as `nobody`, through the user namespace a student's machine uses."
    import shutil
    import subprocess
    system_python = "/usr/bin/python3"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(system_python, os.X_OK):
        pytest.skip("needs root (to become nobody), setpriv and a python that nobody can run")
    root = Path(tempfile.mkdtemp())
    shutil.copy(sb.__file__, root / "sb.py")
    (root / "probe.py").write_text(PROBE)
    for d in ("hidden", "work"):
        (root / d).mkdir()
    (root / "hidden" / "answers.txt").write_text("42")
    for p in [root, *root.rglob("*")]:
        p.chmod(0o777)
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", system_python,
                          str(root / "probe.py"), str(root / "sb.py"), str(root)], capture_output=True, text=True)
    if "unshare" in run.stderr:
        pytest.skip(f"no unprivileged user namespaces here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str([1, 0, [], "Read-only file system", "Network is unreachable", "0000000000000000"])
    assert not (root / "outside").exists()
    shutil.rmtree(root, ignore_errors=True)


def test_without_namespaces_the_grader_still_works_and_names_what_is_lost():
    "The path of a machine without namespaces (macOS, locked-down Linux), forced here with namespaces=False."
    from gguf import GGMLQuantizationType, quants
    from course_lib import grading
    solution = Path(__file__).parent / "homework" / "solutions" / "quantization.py"
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    with Sandbox(timeout=30, namespaces=False) as box:
        sub = load_submission_in(box, solution.read_text(), "q.py", ["quantize_q5_0"])
        got = sub.get("quantize_q5_0")(x)
        pid, ppid, *_ = load_submission_in(box, SOURCE, "s.py", ["identity"]).get("identity")()
        lost = dict(box.lost)
    assert np.array_equal(got.numpy(), quants.quantize(x.numpy(), GGMLQuantizationType.Q5_0))
    assert pid != 1 and ppid != 0                                   # an ordinary child of the supervisor
    assert {"network", "files", "hidden", "lifetime"} <= set(lost)
    assert all("turned off by Sandbox(namespaces=False)" in lost[g] for g in ("network", "files", "hidden"))
    result = grading.SubmissionResult("ada", "quantization", [("quantize", 3, 3, "")], lost=lost)
    note = grading.isolation_note([result, result])                 # once, however many submissions lost it
    assert note.count("\n") == len(lost) - 1 and "'has no network': no namespaces" in note
