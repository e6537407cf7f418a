"""Hostile (issue 13): forges a results file from the paths in sys.argv, then exits before any test runs.

Against the old grader, which read its scores from a file the submission's own process wrote, this scored 10/10."""
import json
import os
import sys

for arg in sys.argv[1:]:
    try:
        with open(arg, "a") as f:
            for test in ("quantize", "quantize_edges", "dequantize", "round_trip"):
                f.write(json.dumps({"test": test, "passed": True, "feedback": ""}) + "\n")
            f.write(json.dumps({"done": True}) + "\n")
    except OSError:
        pass
os._exit(0)
