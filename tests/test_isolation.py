"""The autouse guard of `conftest.py` fails a test that leaks process state, and undoes the leak."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

LEAKY_TESTS = '''
import os, subprocess, sys, time

def test_sets_a_variable():
    os.environ["ATLAS_LEAK_PROBE"] = "1"

def test_sees_no_variable():
    assert "ATLAS_LEAK_PROBE" not in os.environ

def test_changes_directory(tmp_path):
    os.chdir(tmp_path)

def test_starts_a_process_it_leaves_running():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

def test_draws_a_random_number():
    import torch
    assert torch.rand(1).item() == FIRST_DRAW
'''


@pytest.mark.slow  # the leaked process gets the guard's full grace period
def test_the_guard_fails_each_leak_and_the_next_test_starts_clean(pytester):
    import torch

    torch.manual_seed(0)
    first_draw = torch.rand(1).item()
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(helpers=(Path(__file__).parent / "helpers.py").read_text())  # the conftest imports it
    pytester.makepyfile(test_leaks=LEAKY_TESTS.replace("FIRST_DRAW", repr(first_draw)))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, errors=3)
    output = result.stdout.str()
    assert "environment variables ['ATLAS_LEAK_PROBE']" in output
    assert "working directory:" in output
    assert "still running" in output and "time.sleep(60)" in output

