"""The exercise checkers, one module per chapter, each generated from the checkers section at the end of
its notebook (`#| export checks.<chapter>`). Use them through the index `course_lib.check`."""
