"""Hostile (issue 13): kills its parent process, which in the old design was the grader itself."""
import os
import signal

os.kill(os.getppid(), signal.SIGKILL)
