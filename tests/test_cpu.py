"""CPU process settings for training."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_training_settings_take_effect_in_a_fresh_process():
    code = ("import torch; from quietstar.training.cpu import tune_for_training; "
            "print(tune_for_training(), torch.tensor([1e-323], dtype=torch.float64).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # A subnormal float64 reads back as 0 once denormals are flushed.
    assert out.stdout.strip() == "{'flush_denormal': True, 'keep_freed_memory': True} 0.0"
