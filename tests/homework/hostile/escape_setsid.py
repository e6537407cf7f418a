"""Hostile (issue 13): leaves a process behind: fork, setsid, fork again, and exec a sleeper with an empty
environment (so only its command line, with a marker, identifies it)."""
import os
import sys


def quantize_q5_0(x):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)  # escaped-submission-7f3a"], {})
        os._exit(0)
    os.wait()
    return x


def dequantize_q5_0(blocks):
    return blocks
