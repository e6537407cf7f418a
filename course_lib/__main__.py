"""`python -m course_lib COMMAND`: the course's command line (`fetch`; later chapters add more).

Written by hand and kept tiny: it only calls `main`, which chapter 07 exports into `course_lib.weights`.
"""
import sys

from course_lib.weights import main

if __name__ == "__main__":
    sys.exit(main())
