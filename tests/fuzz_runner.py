"""What the fuzz suites (test_gguf_fuzz.py, test_checkpoint_fuzz.py) share: the cases run in one worker process
(under the worker's own memory limit and per-case alarm), so a case that hangs or explodes fails a test instead
of the test run; then every case must have ended in a clear error or the original model."""
import json
import subprocess
import sys
from pathlib import Path


def run_worker(worker: str, *args, timeout: int = 900) -> tuple:
    """Run `worker` (Python source) with `args`. It prints {"start": i} before case i and {"case": i, "result": r}
    after it; r is "same", "DIFFERENT MODEL", "ValueError: ...", "TypeError: ..." or "UNEXPECTED ...".
    Returns ({case: result}, [started cases], the CompletedProcess)."""
    run = subprocess.run([sys.executable, "-c", worker, *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, cwd=Path(__file__).parents[1])
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    results = {e["case"]: e["result"] for e in events if "case" in e}
    return results, [e["start"] for e in events if "start" in e], run


def assert_every_case_ended(descriptions: list, results: dict, started: list, run, at_least: int) -> None:
    crashed = [descriptions[i] for i in started if i not in results]
    assert not crashed, f"the worker died (code {run.returncode}) in case {crashed}: {run.stderr[-2000:]}"
    assert len(results) == len(descriptions) >= at_least, (len(results), len(descriptions), run.stderr[-2000:])


def assert_clear_error_or_same_model(descriptions: list, results: dict) -> None:
    bad = [(descriptions[i], r) for i, r in results.items()
           if not (r == "same" or r.startswith(("ValueError: ", "TypeError: ")))]
    assert not bad, f"{len(bad)} of {len(results)}:\n" + "\n".join(f"{what}: {r}" for what, r in bad)
