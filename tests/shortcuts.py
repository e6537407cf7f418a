"""Helpers for the tests of the checkers' NoShortcuts guard (chapter 00): copies of the reference, refusals."""
import inspect
import textwrap


def source_copy(module, *names):
    """Fresh definitions of `module`'s `names`, executed from their source in a copy of the module's globals.

    The same code as the reference, as new function objects: what a student who retyped it would hand in,
    which the checkers must accept (the reference's own objects are switched off while a candidate runs).
    Copy the private helpers a function calls too, before it, so the copy calls the copies."""
    namespace = dict(vars(module))
    for name in names:
        source = textwrap.dedent(inspect.getsource(getattr(module, name)))
        exec(compile(source, f"<copy of {module.__name__}.{name}>", "exec"), namespace)
    copies = [namespace[name] for name in names]
    return copies[0] if len(copies) == 1 else copies


def refused(result, what: str) -> bool:
    "True when a CheckResult failed because the candidate used `what`, which the checker switches off."
    text = str(result)
    return not result and "wants your own code" in text and what in text
