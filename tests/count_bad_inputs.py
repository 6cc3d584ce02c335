"""Count the bad-input cases of the test matrix (issue 7 item 1), for README.md and docs/GUARANTEES.md.

    python tests/count_bad_inputs.py [test files...]     # default: the files listed in FILES

Runs the files with pytest and ``pytest.raises`` instrumented: one *rejection* is one
``pytest.raises`` block (or call) that caught the exception it expected. A case that a test
expects to be rejected but that the code does not reject fails the test instead, so it is never
counted. Also reported per file: the tests that passed without any rejection (for
``test_strides.py``: the strided inputs accepted and checked bitwise equal to contiguous ones),
and the ``xfail`` tests (known bugs, each one bad input). Exits non-zero if a test failed.

Not collected by pytest (the name does not start with ``test_``).
"""
from __future__ import annotations

import collections
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["test_validation.py", "test_strides.py", "test_module_cpu.py::test_nsa_attention_bad_arguments",
         "test_module_cpu.py::test_module_bad_arguments", "test_cache_cpu.py::test_cache_errors"]


class _Counting:
    """pytest plugin: counts successful pytest.raises per test item and the outcome of each item."""

    def __init__(self):
        self.current = None
        self.rejections = collections.Counter()  # nodeid -> successful pytest.raises
        self.outcomes = {}  # nodeid -> (outcome, was_xfail)
        self._orig = pytest.raises

    def install(self):
        orig, counter = self._orig, self

        class _Wrapped:
            def __init__(self, inner):
                self.inner = inner

            def __enter__(self):
                return self.inner.__enter__()

            def __exit__(self, *exc):
                suppressed = self.inner.__exit__(*exc)
                if suppressed and counter.current is not None:
                    counter.rejections[counter.current] += 1
                return suppressed

        def raises(*args, **kwargs):
            if len(args) > 1 and callable(args[1]):  # pytest.raises(exc, func, *args): function form
                info = orig(*args, **kwargs)
                if counter.current is not None:
                    counter.rejections[counter.current] += 1
                return info
            return _Wrapped(orig(*args, **kwargs))

        pytest.raises = raises

    def uninstall(self):
        pytest.raises = self._orig

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        self.current = item.nodeid
        try:
            yield
        finally:
            self.current = None

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.outcomes[report.nodeid] = (report.outcome, hasattr(report, "wasxfail"))


def main(argv):
    files = argv or FILES
    paths = [f if os.path.isabs(f) or os.path.exists(f.split("::")[0]) else os.path.join(HERE, f) for f in files]
    plugin = _Counting()
    plugin.install()
    try:
        rc = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", *paths], plugins=[plugin])
    finally:
        plugin.uninstall()
    rows = collections.OrderedDict((os.path.basename(p.split("::")[0]), [0, 0, 0, 0]) for p in paths)
    for nodeid, (outcome, xfail) in plugin.outcomes.items():
        name = os.path.basename(nodeid.split("::")[0])
        row = rows.setdefault(name, [0, 0, 0, 0])
        n = plugin.rejections.get(nodeid, 0)
        if xfail:
            row[2] += 1
        elif outcome == "passed":
            row[0] += n
            row[1] += n == 0
        elif outcome == "failed":
            row[3] += 1
    print()
    print(f"{'file':28s} {'rejections':>10s} {'passed, no rejection':>21s} {'xfail':>6s} {'failed':>7s}")
    total = [0, 0, 0, 0]
    for name, row in rows.items():
        print(f"{name:28s} {row[0]:10d} {row[1]:21d} {row[2]:6d} {row[3]:7d}")
        total = [a + b for a, b in zip(total, row)]
    print(f"{'total':28s} {total[0]:10d} {total[1]:21d} {total[2]:6d} {total[3]:7d}")
    return 1 if total[3] or rc not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
