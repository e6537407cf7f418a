"""The checker machinery of chapter 00: compare() and run_cases()."""
import pytest
import torch

from course_lib.checking import Case, CheckResult, compare, run_cases


def test_compare_accepts_equal_within_tolerance():
    x = torch.randn(3, 4)
    assert compare(x + 1e-7, x) is None


@pytest.mark.parametrize("actual, expected, words", [
    ([1.0], torch.tensor([1.0]), "should be a torch.Tensor, got list"),
    (torch.zeros(2, 3), torch.zeros(3, 2), "shape (2, 3), expected (3, 2)"),
    (torch.zeros(2, dtype=torch.float64), torch.zeros(2), "dtype torch.float64, expected torch.float32"),
    (torch.tensor([0.0, float("nan")]), torch.tensor([0.0, 1.0]), "NaN at [1]"),
    (torch.tensor([[0.0, 0.0], [0.0, 5.0]]), torch.zeros(2, 2), "largest error 5; at [1, 1] got 5, expected 0"),
    (torch.tensor([1 + 1j]), torch.tensor([1 - 1j]), "at [0, 1] got 1, expected -1"),  # imaginary parts count
])
def test_compare_names_the_first_problem(actual, expected, words):
    problem = compare(actual, expected)
    assert problem is not None and words in problem


def test_run_cases_reports_exceptions_and_hints():
    def candidate(x):
        if x < 0:
            raise ValueError("negative")
        return x
    result = run_cases("identity", candidate, [
        Case("x = 1", lambda f: None if f(1) == 1 else "wrong"),
        Case("x = -1", lambda f: None if f(-1) == -1 else "wrong", hint="handle negatives"),
    ])
    assert isinstance(result, CheckResult) and not result
    assert result.n_cases == 2 and len(result.failures) == 1
    text = str(result)
    assert "failed 1 of 2" in text and "raised ValueError: negative" in text and "handle negatives" in text


def test_run_cases_rejects_a_non_callable():
    with pytest.raises(TypeError, match="candidate should be a function or class, got int"):
        run_cases("x", 3, [])


def _cases(n):
    return [Case(f"x = {i}", (lambda i: lambda f: None if f(i) == i else "wrong")(i), hint=f"hint {i}")
            for i in range(n)]


def test_a_stub_gets_one_line_not_one_per_case():
    def stub(x):
        raise NotImplementedError
    result = run_cases("identity", stub, _cases(5))
    assert not result and result.n_cases == 5 and len(result.failures) == 1
    assert "so the other 4 cases were not run" in str(result) and "replace `raise NotImplementedError`" in str(result)


def test_not_implemented_after_the_first_case_is_an_ordinary_failure():
    def partial(x):
        if x >= 3:
            raise NotImplementedError
        return x
    result = run_cases("identity", partial, _cases(5))
    assert [d for d, _, _ in result.failures] == ["x = 3", "x = 4"]
    assert all(p == "raised NotImplementedError" for _, p, _ in result.failures)


def test_stop_after_first_failure_reports_only_that_case():
    wrong = lambda x: x + 1  # noqa: E731
    assert len(run_cases("identity", wrong, _cases(3)).failures) == 3
    result = run_cases("identity", wrong, _cases(3), stop_after_first_failure=True)
    assert len(result.failures) == 1 and "hint 0 (the other cases run once this one passes)" in str(result)
    assert run_cases("identity", lambda x: x, _cases(3), stop_after_first_failure=True)


# ---------------------------------------------------------------- NoShortcuts (issue 16)
def _double_cases(reference):
    x = torch.arange(4.0)
    return [Case("x = 0..3", lambda f: compare(f(x), reference(x)))]


@torch.no_grad()
def _reference_double(x):
    return x * 2


def test_no_shortcuts_refuses_the_forbidden_only_on_behalf_of_the_candidate():
    from course_lib.checking import run_cases
    cases = _double_cases(_reference_double)                     # the checker calls the reference itself
    assert run_cases("double", lambda x: x + x, cases, forbidden=[_reference_double])

    @torch.no_grad()                                              # decorated like the reference: not confused with it
    def own(x):
        return x * 2
    assert run_cases("double", own, cases, forbidden=[_reference_double])
    refusals = {
        "a wrapper": lambda x: _reference_double(x),
        "the reference itself": _reference_double,
        "a builtin": lambda x: torch.mul(x, 2),
        "a tensor method": lambda x: x.mul(2),
    }
    for what, candidate in refusals.items():
        result = run_cases("double", candidate, cases, forbidden=[_reference_double, torch.mul, torch.Tensor.mul])
        assert not result and "double wants your own code" in str(result), what


def test_no_shortcuts_sees_through_catching_and_inheritance_and_restores_the_profiler():
    import sys
    from course_lib.checking import run_cases

    def caught(x):
        try:
            return _reference_double(x)
        except RuntimeError:
            return _reference_double(x)                            # the profiler is gone after the first refusal
    cases = _double_cases(_reference_double)
    assert "wants your own code" in str(run_cases("double", caught, cases, forbidden=[_reference_double]))

    class Base(torch.nn.Module):
        def forward(self, x):
            return x * 2

    class Derived(Base):
        pass
    layer_cases = [Case("x", lambda cls: compare(cls()(torch.ones(2)), torch.full((2,), 2.0)))]
    assert "derives from" in str(run_cases("layer", Derived, layer_cases, forbidden=[Base]))
    before = sys.getprofile()
    run_cases("double", caught, cases, forbidden=[_reference_double])
    assert sys.getprofile() is before
