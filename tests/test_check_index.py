"""Every exercise checker `check_<name>` is reachable as `course_lib.check.<name>`, and the checkers live in
`course_lib.checks.<chapter>`, not in the model's modules."""
import importlib
import pkgutil

import pytest

import course_lib
import course_lib.check as check
import course_lib.checking as checking
import course_lib.checks

# the modules that hold the model's code: no exercise checker and no checker helper belongs in them
# (`check_` is the exercise checkers' prefix: input checks are named validate_* or _check_*)
MODEL_MODULES = ["tokenizer", "rmsnorm", "rope", "attention", "feed_forward", "model", "decoding", "gguf_format",
                 "weights", "gguf_tokenizer", "generation", "fused", "cli"]


def _modules():
    "course_lib's top-level modules and the checker modules in course_lib.checks."
    for package in (course_lib, course_lib.checks):
        for info in pkgutil.iter_modules(package.__path__):
            if package is course_lib and info.name in ("check", "checks", "__main__"):
                continue
            yield importlib.import_module(f"{package.__name__}.{info.name}")


def chapter_checkers():
    "(name, checker, module name) for every exported `check_<name>` that grades an exercise."
    for module in _modules():
        for name in getattr(module, "__all__", []):
            if name.startswith("check_"):
                yield name[len("check_"):], getattr(module, name), module.__name__


def test_checks_modules_are_scanned():
    found = {module for _, _, module in chapter_checkers()}
    for chapter in ("tokenizer", "rmsnorm", "rope", "attention", "feed_forward", "model", "weights", "gguf_tokenizer",
                    "generation", "cli"):
        assert f"course_lib.checks.{chapter}" in found, f"no checker found in course_lib.checks.{chapter}"


def test_every_checker_is_indexed_once():
    found = list(chapter_checkers())
    assert found, "no checkers found in the chapter modules"
    where = {}
    for name, _, module in found:
        where.setdefault(name, []).append(module)
    twice = {name: modules for name, modules in where.items() if len(modules) > 1}
    assert not twice, f"checkers exported by more than one module: {twice}"
    missing = sorted(name for name, fn, _ in found if getattr(check, name, None) is not fn)
    assert not missing, f"add these to course_lib/check.py: {missing}"


def test_checkers_reject_non_callables():
    for name, fn, _ in chapter_checkers():
        try:
            fn(42)
        except TypeError:
            continue
        raise AssertionError(f"check.{name}(42) should raise TypeError for a non-callable candidate")


@pytest.mark.parametrize("name", MODEL_MODULES)
def test_model_modules_hold_no_checker_code(name):
    module = importlib.import_module(f"course_lib.{name}")
    defined = [n for n, obj in vars(module).items()
               if n.startswith("check_") and getattr(obj, "__module__", module.__name__) == module.__name__]
    assert not defined, f"course_lib.{name} defines checkers {defined}: move them to course_lib.checks.{name}"
    exported = [n for n in getattr(module, "__all__", []) if n.startswith("check_")]
    assert not exported, f"course_lib.{name} exports checkers {exported}"
    # the checkers' machinery (test cases, reports) is imported only by checker modules
    machinery = [n for n in ("Case", "CheckResult", "run_cases") if vars(module).get(n) is getattr(checking, n)]
    assert not machinery, f"course_lib.{name} imports {machinery} from course_lib.checking: checker code left behind"

