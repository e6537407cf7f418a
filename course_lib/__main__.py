"""`python -m course_lib COMMAND`: the course's command line (fetch, generate, chat, grade).

Written by hand and kept tiny: it only calls `main`, which notebook 07d exports into `course_lib.cli`.
"""
import sys

from course_lib.cli import main

if __name__ == "__main__":
    sys.exit(main())
