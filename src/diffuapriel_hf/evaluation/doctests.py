"""A function's doctests run against another version of its source (a model's completion of it), in a subprocess of
their own: the function's module imported, the function replaced by the new source (a method on its class, a
top-level function in the module, so the module's other functions call it too), and the examples of its docstring
found by `doctest.DocTestFinder` and run by `doctest.DocTestRunner` (default option flags). The version passes only if
it has examples and all of them pass. `benchmarks/speed_quality.py` scores completions of held-out standard-library
functions with it.

Generated code is untrusted, so the subprocess is fenced in: a wall-clock timeout (its whole process group killed at
the end), resource limits (CPU seconds, address space, file size, no core files), a fresh temporary working directory
(also its HOME and TMPDIR), an environment of PATH and those alone, and Python in isolated mode (`-I`: no PYTHON*
variables, no user site, neither the script's folder nor the working directory on sys.path). This is a sandbox for
mistakes, not for malice: the network and the rest of the file system stay reachable.

This file imports only the standard library: the subprocess runs it as a script, without the package (and torch).
"""

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

__all__ = ["DoctestOutcome", "run_function_doctests", "sandbox_limits"]

STATUSES = ("passed", "failed", "timeout", "crashed")
DETAIL_CHARS = 2000  # of a failure's report or a crash's stderr, kept for reading


@dataclass(frozen=True)
class DoctestOutcome:
    """status: "passed" (examples found, none failed), "failed" (an example failed, or none were found), "timeout"
    (the wall-clock or the CPU limit ended it) or "crashed" (it ended otherwise without a report: the source did not
    compile, the function could not be found, the process died). attempted / failed: examples run / failed."""

    status: str
    attempted: int = 0
    failed: int = 0
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def sandbox_limits(cpu_seconds: int, memory_bytes: int, file_bytes: int):
    """The function that the subprocess runs before Python starts (Popen's preexec_fn): its resource limits."""

    def limit():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))  # SIGXCPU at the soft limit
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return limit


def run_function_doctests(module: str, qualname: str, source: str, timeout: float = 5.0, cpu_seconds: int = 4,
                          memory_bytes: int = 2 << 30, file_bytes: int = 1 << 20) -> DoctestOutcome:
    """Runs the doctests of `module`'s function `qualname` ("name" or "Class.name") with its source replaced by
    `source` (the whole `def`, at any indentation) in a fenced subprocess; see the module's docstring."""
    if qualname.count(".") > 1 or not qualname:
        raise ValueError(f"qualname must be a top-level function or a method of a top-level class, got {qualname!r}")
    if not timeout > 0 or cpu_seconds < 1 or memory_bytes < 1 or file_bytes < 0:
        raise ValueError(f"timeout, cpu_seconds and memory_bytes must be positive, file_bytes not negative: got "
                         f"{timeout}, {cpu_seconds}, {memory_bytes}, {file_bytes}")
    job = json.dumps(dict(module=module, qualname=qualname, source=source))
    with tempfile.TemporaryDirectory(prefix="doctest-") as folder:
        environment = dict(PATH=os.defpath, HOME=folder, TMPDIR=folder, LC_ALL="C.UTF-8")
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", os.path.abspath(__file__)], cwd=folder, env=environment,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=sandbox_limits(cpu_seconds, memory_bytes, file_bytes), start_new_session=True)
        try:
            stdout, stderr = process.communicate(job, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its children too (start_new_session made it a group leader)
            process.communicate()
            return DoctestOutcome("timeout", detail=f"more than {timeout} s of wall-clock time")
    if process.returncode == -signal.SIGXCPU:
        return DoctestOutcome("timeout", detail=f"more than {cpu_seconds} s of CPU time")
    report = stdout.rstrip("\n").rsplit("\n", 1)[-1]
    if process.returncode != 0 or not report.startswith("{"):
        return DoctestOutcome("crashed", detail=f"exit status {process.returncode}: {stderr[-DETAIL_CHARS:]}")
    counts = json.loads(report)
    status = "passed" if counts["attempted"] > 0 and counts["failed"] == 0 else "failed"
    return DoctestOutcome(status, counts["attempted"], counts["failed"], counts["detail"])


def _replace_and_run(job: dict) -> dict:
    """In the subprocess: compiles the job's source in its module's namespace, puts the function in place of the
    original and runs its docstring's examples. A method is compiled inside a class of its class's name, so that
    private names are mangled as in the original."""
    import doctest
    import importlib
    import io
    import textwrap

    module = importlib.import_module(job["module"])
    *owner_name, name = job["qualname"].split(".")
    source = textwrap.dedent(job["source"])
    scratch = {}
    if owner_name:
        source = f"class {owner_name[0]}:\n" + textwrap.indent(source, "    ")
    exec(compile(source, f"<completion of {job['module']}.{job['qualname']}>", "exec"), vars(module), scratch)
    owner = getattr(module, owner_name[0]) if owner_name else module
    function = vars(scratch[owner_name[0]])[name] if owner_name else scratch[name]
    setattr(owner, name, function)
    tests = doctest.DocTestFinder(recurse=False).find(function, name=f"{job['module']}.{job['qualname']}",
                                                      module=module, globs=dict(vars(module)))
    runner, report = doctest.DocTestRunner(verbose=False), io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    failed, attempted = runner.summarize(verbose=False)
    return dict(attempted=attempted, failed=failed, detail=report.getvalue()[-DETAIL_CHARS:])


if __name__ == "__main__":
    print(json.dumps(_replace_and_run(json.load(sys.stdin))), flush=True)
