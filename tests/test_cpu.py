"""CPU process settings for training: what they do, and who applies them (the command, not
Python's ``train()`` unless asked)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quietstar.cli import train as command
from quietstar.training.config import TrainConfig
from quietstar.training.recipe import train


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_training_settings_take_effect_in_a_fresh_process():
    code = ("import torch; from quietstar.training.cpu import tune_for_training; "
            "print(tune_for_training(), torch.tensor([1e-323], dtype=torch.float64).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # A subnormal float64 reads back as 0 once denormals are flushed.
    assert out.stdout.strip() == "{'flush_denormal': True, 'keep_freed_memory': True} 0.0"


def denormals_kept() -> bool:
    return bool(torch.tensor(1e-40) * 1 != 0)  # 1e-40 is a subnormal float32


@pytest.fixture
def denormals_on(monkeypatch):
    """Denormals kept at the start (whatever an earlier test did to this process), the state
    put back after; malloc's settings left alone (recorded instead)."""
    before = denormals_kept()
    torch.set_flush_denormal(False)
    malloc_calls = []
    monkeypatch.setattr("quietstar.training.cpu.keep_freed_memory", lambda: malloc_calls.append(1) or True)
    monkeypatch.setattr("quietstar.training.recipe.plot_training_curves", lambda *args: None)
    yield malloc_calls
    torch.set_flush_denormal(not before)


TINY = dict(seq_len=16, batch_size=2, micro_batch_size=1, max_steps=1, learning_rate=1e-3,
            warmup_steps=0, eval_every=0, sample_every=0, num_documents=40)


def test_train_from_python_leaves_the_process_alone_unless_asked(denormals_on, tiny_model_dir, tmp_path):
    def config(out: str) -> TrainConfig:
        return TrainConfig.from_dict({**TINY, "model": str(tiny_model_dir), "output_dir": str(tmp_path / out),
                                      "quietstar": {"sampled_thought_tokens": 2, "ahead_tokens": 2}})

    train(config("plain"))
    assert denormals_kept() and denormals_on == []
    train(config("tuned"), tune_cpu=True)
    assert not denormals_kept() and denormals_on == [1]


def test_quietstar_train_tunes_the_process_on_cpu(denormals_on, tiny_model_dir, tmp_path):
    argv = ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
            "--sampled-thought-tokens", "2", "--ahead-tokens", "2",
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    assert command.main(argv) == 0
    assert not denormals_kept() and denormals_on == [1]
