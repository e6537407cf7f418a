"""Issue 13: hostile submissions against the sandboxed grader. Each attack gets 0 on the tests it touches,
with a clear reason; the run finishes, every other submission is graded, and no process of a submission is
alive afterwards. Where an attack would succeed without the sandbox, a control shows that it does."""
import csv
import socketserver
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from course_lib import grading
from course_lib.sandbox import Sandbox

HW = Path(__file__).parent / "homework"
HOSTILE, SOLUTION = HW / "hostile", HW / "solutions" / "quantization.py"
ATTACKS = ("forge_results", "patch_grader", "kill_grader", "escape_setsid", "fork_bomb", "huge_output",
           "read_solution")


@pytest.fixture(scope="module")
def lost():
    "The isolation guarantees this machine cannot give (none on Linux with user namespaces, or as root)."
    with Sandbox(timeout=30) as box:
        return dict(box.lost)


class _Oracle(socketserver.BaseRequestHandler):
    "A cheat's helper on this machine: send float32 blocks, get gguf's Q5_0 bytes back."
    def handle(self):
        n = int.from_bytes(self.request.recv(8), "little")
        data = b""
        while len(data) < n:
            data += self.request.recv(n - len(data))
        x = np.frombuffer(data, dtype=np.float32).reshape(-1, 32)
        from gguf import GGMLQuantizationType, quants
        self.request.sendall(quants.quantize(x, GGMLQuantizationType.Q5_0).tobytes())


NETWORK_CHEAT = '''
import socket, numpy as np, torch
def quantize_q5_0(x):
    with socket.create_connection(("127.0.0.1", {port}), timeout=5) as s:
        data = x.numpy().astype(np.float32).tobytes()
        s.sendall(len(data).to_bytes(8, "little") + data)
        out = b""
        while len(out) < x.shape[0] * 22:
            out += s.recv(65536)
    return torch.frombuffer(bytearray(out), dtype=torch.uint8).reshape(x.shape[0], 22)
def dequantize_q5_0(blocks):
    raise NotImplementedError
'''

WRITE_OUTSIDE = '''
def quantize_q5_0(x):
    with open({target!r}, "w") as f:
        f.write("written by a submission")
    return x
def dequantize_q5_0(blocks):
    raise NotImplementedError
'''


def _living(marker: bytes) -> list:
    "Processes whose command line or environment holds `marker`."
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (d / "cmdline").read_bytes() or marker in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def oracle():
    server = socketserver.TCPServer(("127.0.0.1", 0), _Oracle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def graded(tmp_path_factory, oracle):
    "Every attack, then the reference solution, in one grading run (as a class's submissions would be)."
    tmp = tmp_path_factory.mktemp("submissions")
    (tmp / "network_cheat.py").write_text(NETWORK_CHEAT.format(port=oracle))
    outside = Path(tempfile.mkdtemp())            # writable by anyone: only the read-only mount can stop it
    outside.chmod(0o777)
    target = outside / "pwned.txt"
    (tmp / "write_outside.py").write_text(WRITE_OUTSIDE.format(target=str(target)))
    (tmp / "=HYPERLINK(0).py").write_text(SOLUTION.read_text())
    files = ([HOSTILE / f"{a}.py" for a in ATTACKS] + [tmp / "network_cheat.py", tmp / "write_outside.py",
             tmp / "=HYPERLINK(0).py", SOLUTION])
    csv_path = tmp / "grades.csv"
    tokens, start = [], Sandbox.start                     # this run's sandboxes (another test may run its own)
    def recording_start(self):
        start(self)
        tokens.append(self.token)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Sandbox, "start", recording_start)
        results = grading.grade("quantization", files, csv_path=csv_path, timeout=20, memory_mb=2048)
    assert len(tokens) >= len(files)
    alive = [pid for t in tokens for pid in _living(f"COURSE_SANDBOX={t}".encode())]
    alive += _living(b"escaped-submission-7f3a")
    return {"results": {r.student: r for r in results}, "target": target, "csv": csv_path, "alive": alive}


def _skip_unless(lost, *guarantees):
    missing = [g for g in guarantees if g in lost]
    if missing:
        pytest.skip(f"this machine cannot give: {', '.join(missing)} ({lost[missing[0]]})")


def test_the_run_finishes_with_a_row_for_every_submission(graded):
    results = graded["results"]
    assert len(results) == len(ATTACKS) + 4
    assert results["quantization"].score == 10, results["quantization"].feedback   # graded after every attack
    assert results["=HYPERLINK(0)"].score == 10


@pytest.mark.parametrize("attack", ATTACKS + ("network_cheat", "write_outside"))
def test_every_attack_scores_zero(graded, attack, lost):
    if attack in ("network_cheat",):
        _skip_unless(lost, "network")
    if attack in ("write_outside",):
        _skip_unless(lost, "files")
    if attack == "read_solution":
        _skip_unless(lost, "hidden")
    r = graded["results"][attack]
    assert r.score == 0, (attack, r.feedback)


def test_forged_results_and_a_patched_grader_change_nothing(graded):
    forged, patched = graded["results"]["forge_results"], graded["results"]["patch_grader"]
    assert "did not load: the process exited with code 0" in forged.feedback
    assert all(fb == "not written yet: still raises NotImplementedError" for *_, fb in patched.rows)


def test_a_submission_cannot_kill_the_grader(graded, lost):
    _skip_unless(lost, "signals")
    r = graded["results"]["kill_grader"]                # its parent pid is 0 (outside its namespace): the
    assert r.score == 0 and "defines no `quantize_q5_0`" in r.feedback    # kill reached no one, and we went on


def test_no_process_of_a_submission_outlives_grading(graded, lost):
    _skip_unless(lost, "lifetime")
    assert graded["alive"] == []
    assert graded["results"]["escape_setsid"].score == 0


def test_a_fork_bomb_stops_at_the_process_limit(graded, lost):
    _skip_unless(lost, "processes")
    rows = {name: fb for name, _, _, fb in graded["results"]["fork_bomb"].rows}
    assert "BlockingIOError" in rows["quantize"] and "Resource temporarily unavailable" in rows["quantize"]


def test_huge_output_is_cut_and_marked_as_the_students(graded):
    r = graded["results"]["huge_output"]
    assert "printed more than 8 MB in test quantize" in r.feedback
    assert "(the submission printed: «" in r.feedback and len(r.feedback) < 600


def test_reading_the_reference_solution_fails_in_the_sandbox_only(graded, lost):
    _skip_unless(lost, "hidden")
    assert "FileNotFoundError" in graded["results"]["read_solution"].feedback
    ns = {}                                           # control: in the student's own process it works
    exec((HOSTILE / "read_solution.py").read_text(), ns)
    assert grading.check("quantization", ns).score == 10


def test_the_network_is_out_of_reach(graded, oracle, lost):
    _skip_unless(lost, "network")
    assert "Network is unreachable" in graded["results"]["network_cheat"].feedback
    ns = {}                                           # control: outside the sandbox the cheat works
    exec(NETWORK_CHEAT.format(port=oracle), ns)
    assert grading.check("quantization", ns, only=["quantize", "quantize_edges"]).score == 5


def test_writing_outside_its_folder_fails(graded, lost):
    _skip_unless(lost, "files")
    assert "Read-only file system" in graded["results"]["write_outside"].feedback
    assert not graded["target"].exists()


def test_a_formula_in_a_file_name_stays_text_in_the_csv(graded):
    rows = list(csv.DictReader(graded["csv"].open()))
    names = [r["student"] for r in rows]
    assert "'=HYPERLINK(0)" in names and not any(n.startswith(("=", "+", "-", "@")) for n in names)
    assert all(not r["feedback"].startswith(("=", "+", "-", "@")) for r in rows)
