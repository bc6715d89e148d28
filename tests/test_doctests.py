"""The fenced doctest runner (diffuapriel_hf.evaluation.doctests): hand-written versions of standard-library functions
whose docstrings hold examples, right and wrong, and ones that hang, die or reach past their limits."""

import textwrap

import pytest

from diffuapriel_hf.evaluation.doctests import run_function_doctests


def mean_returning(expression: str, examples: str = ">>> mean([1, 2, 3, 4])\n2.5") -> str:
    """A replacement of statistics.mean (indented as a method would be: the runner dedents) that returns `expression`
    and whose docstring holds `examples`."""
    docstring = textwrap.indent(examples, "    ")
    return textwrap.indent(f'def mean(data):\n    """\n{docstring}\n    """\n    return {expression}\n', "    ")


def test_a_right_function_passes_and_a_wrong_one_fails():
    right = run_function_doctests("statistics", "mean", mean_returning("sum(data) / len(data)"))
    assert (right.status, right.attempted, right.failed, right.passed) == ("passed", 1, 0, True)
    wrong = run_function_doctests("statistics", "mean", mean_returning("sum(data) / (len(data) + 1)"))
    assert (wrong.status, wrong.attempted, wrong.failed, wrong.passed) == ("failed", 1, 1, False)
    assert "Expected:\n    2.5\nGot:\n    2.0" in wrong.detail


def test_a_method_is_replaced_on_its_class_and_a_function_in_its_module():
    ratio = textwrap.indent(textwrap.dedent('''\
        def ratio(self):
            """
            >>> SequenceMatcher(None, "abcd", "bcde").ratio()
            0.75
            """
            return 2.0 * sum(size for _, _, size in self.get_matching_blocks()) / (len(self.a) + len(self.b))
        '''), "    ")
    assert run_function_doctests("difflib", "SequenceMatcher.ratio", ratio).passed
    # The example reaches the replaced function through its module, and the function the module's other names.
    assert run_function_doctests("statistics", "mean", mean_returning(
        "median_high(data)", ">>> import statistics\n>>> statistics.mean([1, 5, 9])\n5")).passed


def test_a_function_without_examples_does_not_pass():
    assert run_function_doctests("statistics", "mean", mean_returning("0", "No examples.")).status == "failed"


@pytest.mark.parametrize("body, limit", [("__import__('time').sleep(60)", "wall-clock"),
                                         ("[0 for _ in iter(int, 1)]", "CPU")])
def test_a_function_that_does_not_end_times_out(body, limit):
    outcome = run_function_doctests("statistics", "mean", mean_returning(body), timeout=3, cpu_seconds=1)
    assert (outcome.status, outcome.passed) == ("timeout", False)
    assert limit in outcome.detail


@pytest.mark.parametrize("source, message", [(mean_returning("__import__('os')._exit(3)"), "exit status 3"),
                                             ("def mean(data:\n", "SyntaxError"),
                                             (mean_returning("0").replace("def mean", "def average"), "KeyError")])
def test_a_crash_is_reported_as_one(source, message):
    outcome = run_function_doctests("statistics", "mean", source)
    assert (outcome.status, outcome.passed) == ("crashed", False)
    assert message in outcome.detail


def test_the_subprocess_is_fenced():
    examples = textwrap.dedent("""\
        >>> import os
        >>> os.listdir(), sorted(os.environ), os.environ["HOME"] == os.getcwd()
        ([], ['HOME', 'LC_ALL', 'PATH', 'TMPDIR'], True)
        >>> len(bytearray(512 << 20))
        Traceback (most recent call last):
        MemoryError
        >>> open("big", "wb").write(bytes(2 << 20))
        Traceback (most recent call last):
        OSError: [Errno 27] File too large
        """)
    outcome = run_function_doctests("statistics", "mean", mean_returning("0", examples), memory_bytes=256 << 20,
                                    file_bytes=1 << 20)
    assert outcome.passed, outcome.detail


@pytest.mark.parametrize("qualname, arguments, message", [
    ("a.b.c", {}, "qualname"),
    ("", {}, "qualname"),
    ("mean", dict(timeout=0), "timeout"),
    ("mean", dict(cpu_seconds=0), "cpu_seconds"),
])
def test_bad_arguments_are_refused_by_name(qualname, arguments, message):
    with pytest.raises(ValueError, match=message):
        run_function_doctests("statistics", qualname, mean_returning("0"), **arguments)
