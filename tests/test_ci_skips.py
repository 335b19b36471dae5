"""The CI skip guard (tests/ci_skips.py): under CI=true only gpu tests may skip."""

from __future__ import annotations

import pytest

SUITE = """
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="deepspeed is not installed")
def test_needs_deepspeed():
    pass

def test_skips_inside():
    pytest.skip("embedded model unavailable")

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs CUDA")
def test_needs_cuda():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_skip_fails_under_ci_except_gpu_tests(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(SUITE)
    result = pytester.runpytest("-p", "ci_skips", "-rs")
    if ci:
        # a skip at set-up (skipif) is reported as an error, one inside the test as a failure
        result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1)
        assert result.ret != 0
        result.stdout.fnmatch_lines(["*skipped under CI=true, where it must run (*deepspeed is not installed)*",
                                     "*skipped under CI=true, where it must run (*embedded model unavailable)*"])
    else:
        result.assert_outcomes(passed=1, skipped=3)
        assert result.ret == 0
