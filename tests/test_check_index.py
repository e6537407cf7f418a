"""Every exported checker `check_<name>` of a chapter module is reachable as `course_lib.check.<name>`."""
import importlib
import pkgutil

import course_lib
import course_lib.check as check


def chapter_checkers():
    for info in pkgutil.iter_modules(course_lib.__path__):
        if info.name in ("check", "__main__"):
            continue
        module = importlib.import_module(f"course_lib.{info.name}")
        for name in getattr(module, "__all__", []):
            if name.startswith("check_"):
                yield name[len("check_"):], getattr(module, name)


def test_every_checker_is_indexed():
    found = dict(chapter_checkers())
    assert found, "no checkers found in the chapter modules"
    missing = sorted(n for n in found if getattr(check, n, None) is not found[n])
    assert not missing, f"add these to course_lib/check.py: {missing}"


def test_checkers_reject_non_callables():
    for name, fn in chapter_checkers():
        try:
            fn(42)
        except TypeError:
            continue
        raise AssertionError(f"check.{name}(42) should raise TypeError for a non-callable candidate")
