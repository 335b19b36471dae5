"""A quiet run (quietstar/utils/log_filters.py): no DeepSpeed CPU notice without a DeepSpeed config, and no
transformers progress bars while quietstar loads or saves models."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import make_model
from quietstar import QuietStarForCausalLM

NOTICE = "Setting accelerator to CPU"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="needs deepspeed (scripts/setup.sh installs it)")
def test_deepspeed_cpu_notice_dropped_once_quietstar_is_imported():
    def output_of(code: str) -> str:  # DeepSpeed's logger writes to stdout
        env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr
    assert NOTICE in output_of("import deepspeed")           # what users saw, twice per run
    quiet = output_of("import quietstar, deepspeed, logging; logging.getLogger('DeepSpeed').warning('kept')")
    assert NOTICE not in quiet and "kept" in quiet            # other DeepSpeed messages stay


def test_save_and_load_print_no_progress_bars(tmp_path, capfd):
    model = make_model()
    capfd.readouterr()
    model.save_pretrained(tmp_path / "m")
    QuietStarForCausalLM.from_pretrained(tmp_path / "m")
    out, err = capfd.readouterr()
    for bar in ("Writing model shards", "Loading weights", "it/s"):
        assert bar not in out + err
