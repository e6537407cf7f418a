"""Exercise checkers: `course_lib.check.<name>(candidate)` checks your version of `course_lib.<name>`."""
