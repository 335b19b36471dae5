"""Checkpoints: atomic writes, exact resume after SIGKILL, a save on Ctrl-C."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model
from quietstar.training import checkpoint
from quietstar.training.metrics import read_metrics
from quietstar.cli.train import main as train_main


def train_args(model_dir, out, *extra) -> list[str]:
    return [sys.executable, "-m", "quietstar.cli.main", "train", "--model", str(model_dir),
            "--output-dir", str(out), "--seq-len", "16", "--batch-size", "2",
            "--micro-batch-size", "1", "--num-documents", "60", "--learning-rate", "1e-3",
            "--warmup-steps", "2", "--eval-every", "0", "--sample-every", "0",
            "--sampled-thought-tokens", "2", "--ahead-tokens", "2", *extra]


def subprocess_env() -> dict[str, str]:
    # One thread: bitwise-reproducible CPU math, and no fight over the two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    model = checkpoint_dir / "model"
    return load_file(model / "model.safetensors") | load_file(model / "quietstar_head.safetensors")


def wait_for_steps(out: Path, steps: int, process: subprocess.Popen, timeout: float = 180) -> None:
    # Generous: a step takes well under a second, but a shared machine can starve a subprocess.
    deadline = time.monotonic() + timeout
    while len(read_metrics(out / "metrics.jsonl")) < steps:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)


def run_in_process(args: list[str]) -> None:
    """The same command in this process (one thread, like the subprocesses)."""
    assert train_main(args[4:]) == 0  # drop "python -m quietstar.cli.main train"


def test_run_killed_with_sigkill_and_resumed_ends_bitwise_equal(tiny_model_dir, tmp_path):
    steps = 12
    run_in_process(train_args(tiny_model_dir, tmp_path / "whole", "--max-steps", str(steps),
                              "--checkpoint-every", "2"))

    kill_after = random.Random(os.getpid()).randint(3, 7)  # a "random" step, logged on failure
    out = tmp_path / "killed"
    process = subprocess.Popen(train_args(tiny_model_dir, out, "--max-steps", str(steps),
                                          "--checkpoint-every", "2"),
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for_steps(out, kill_after, process)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed or saved
    process.wait()
    reached = len(read_metrics(out / "metrics.jsonl"))
    assert reached < steps, f"the run finished before it could be killed (after {kill_after})"
    latest = checkpoint.latest_checkpoint(out)
    assert latest is not None and checkpoint.step_of(latest) <= reached

    # The resumed run takes every setting from the checkpoint: only --resume is given.
    resumed = subprocess.run([sys.executable, "-m", "quietstar.cli.main", "train", "--resume", str(out)],
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = weights(tmp_path / "whole" / checkpoint.checkpoint_name(steps))
    b = weights(out / checkpoint.checkpoint_name(steps))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs (killed after step {reached})"
    # The metrics read as one run: each step once, with the uninterrupted run's numbers.
    whole_records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for x, y in zip(whole_records, records):
        assert (x["loss"], x["base_nll"], x["grad_norm"]) == (y["loss"], y["base_nll"], y["grad_norm"])


def test_ctrl_c_saves_a_checkpoint_then_exits(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(train_args(tiny_model_dir, out, "--max-steps", "100000",
                                          "--checkpoint-every", "100000"),
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for_steps(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    done = len(read_metrics(out / "metrics.jsonl"))
    saved = checkpoint.latest_checkpoint(out)
    assert saved is not None and checkpoint.step_of(saved) == done
    assert checkpoint.load_training_state(saved)["step"] == done
    assert "Interrupted at step" in stderr and f"--resume {out}" in stderr
    assert "Traceback" not in stderr


def test_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    def save(step: int, fail: bool = False) -> None:
        folder = checkpoint.begin(tmp_path, step)
        (folder / "model").mkdir()
        (folder / "model" / "weights.bin").write_bytes(b"w" * 100)
        if fail:
            raise OSError("disk full")
        checkpoint.save_training_state(folder, {"step": step})
        checkpoint.commit(tmp_path, step, keep=2)

    save(1)
    save(2)
    with pytest.raises(OSError, match="disk full"):
        save(3, fail=True)
    # The half-written folder is hidden, the finished ones are untouched.
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-000001",
                                                                       "checkpoint-000002"]
    assert checkpoint.load_training_state(checkpoint.latest_checkpoint(tmp_path))["step"] == 2
    assert (tmp_path / ".tmp-checkpoint-000003").exists()
    checkpoint.remove_partial(tmp_path)
    assert not (tmp_path / ".tmp-checkpoint-000003").exists()
    save(3)
    save(4)  # keep=2: the oldest go
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(tmp_path)] == [3, 4]
    save(4)  # rewriting a step replaces it whole
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(tmp_path)] == [3, 4]


def test_resume_argument_forms(tmp_path):
    for step in (2, 10):
        checkpoint.begin(tmp_path, step)
        checkpoint.commit(tmp_path, step, keep=5)
    latest = tmp_path / "checkpoint-000010"
    assert checkpoint.resolve_resume("latest", tmp_path) == latest
    assert checkpoint.resolve_resume(str(tmp_path), None) == latest
    assert checkpoint.resolve_resume(str(tmp_path / "checkpoint-000002"), None) == \
        tmp_path / "checkpoint-000002"
    with pytest.raises(checkpoint.CheckpointError, match="needs --output-dir"):
        checkpoint.resolve_resume("latest", None)


def test_rng_states_round_trip_through_a_saved_training_state(tmp_path):
    import numpy as np

    checkpoint.save_training_state(tmp_path, {"rng": checkpoint.capture_rng()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move them on
    checkpoint.restore_rng(checkpoint.load_training_state(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_flipped_bytes_and_missing_files_are_named_before_anything_loads(tiny_model_dir, tmp_path):
    """Every file a checkpoint writes has its SHA-256 in checksums.json, verified on resume before
    any file is read: bytes flipped inside the tensor data (which safetensors loads silently) and a
    missing weights file are named."""
    args = train_args(tiny_model_dir, tmp_path / "run", "--max-steps", "1")
    run_in_process(args)
    ckpt = checkpoint.latest_checkpoint(tmp_path / "run")
    sums = json.loads((ckpt / checkpoint.CHECKSUMS_NAME).read_text())
    assert {"model/model.safetensors", "model/quietstar_head.safetensors", "training_state.pt",
            "train_config.yaml"} <= sums.keys()
    weights_file = ckpt / "model" / "model.safetensors"
    original = weights_file.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) - 100] ^= 0xFF  # inside the last tensor's data, past the header
    weights_file.write_bytes(bytes(flipped))
    load_file(weights_file)  # safetensors itself does not notice
    resume = train_args(tiny_model_dir, tmp_path / "run", "--max-steps", "2", "--resume", "latest")
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.safetensors has changed since it was written"):
        checkpoint.verify_checksums(ckpt)
    assert train_main(resume[4:]) == 2
    weights_file.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.safetensors is missing"):
        checkpoint.verify_checksums(ckpt)
    (ckpt / checkpoint.CHECKSUMS_NAME).unlink()  # no checksums (an older checkpoint): the glob must
    with pytest.raises(checkpoint.CheckpointError, match=r"holds no model\*\.safetensors weights"):
        checkpoint.load_model_weights(make_model(), ckpt)  # not take the head file


def test_a_fresh_start_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')  # the killed run's
    run_in_process(train_args(tiny_model_dir, out, "--max-steps", "3"))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert all(r["loss"] != 9.0 for r in read_metrics(out / "metrics.jsonl"))


def save_by_hand(run_dir: Path, step: int, keep: int | None = 2) -> Path:
    """A checkpoint as save_checkpoint writes one (its files and their checksums), without a model."""
    folder = checkpoint.begin(run_dir, step)
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"w" * 100)
    checkpoint.save_training_state(folder, {"step": step})
    checkpoint.write_checksums(folder)
    return checkpoint.commit(run_dir, step, keep=keep)


def test_rotation_deletes_only_what_the_run_wrote(tmp_path, caplog):
    for step in (1, 2):
        save_by_hand(tmp_path, step)
    (tmp_path / "checkpoint-000001" / "my-eval").mkdir()  # a user's results inside a checkpoint
    (tmp_path / "checkpoint-000001" / "my-eval" / "gsm8k.json").write_text("{}")
    (tmp_path / "checkpoint-000002" / "model" / "notes.txt").write_text("lr 1e-5 was better")
    with caplog.at_level("WARNING", logger="quietstar.training.checkpoint"):
        save_by_hand(tmp_path, 3)
        save_by_hand(tmp_path, 4)
        save_by_hand(tmp_path, 5)
    # The two with the user's files stay; complete checkpoints of the run beyond the newest two go.
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "checkpoint-000001", "checkpoint-000002", "checkpoint-000004", "checkpoint-000005"]
    assert (tmp_path / "checkpoint-000001" / "my-eval" / "gsm8k.json").exists()
    warnings = caplog.text
    assert f"kept {tmp_path / 'checkpoint-000001'} (beyond --keep-checkpoints 2): it holds files a checkpoint " \
           "does not (my-eval); delete it yourself when done" in warnings
    assert "(model/notes.txt)" in warnings
    # Without checksums (an older checkpoint): the protocol's names only, with a training state.
    (tmp_path / "checkpoint-000004" / "checksums.json").unlink()
    assert checkpoint.foreign_files(tmp_path / "checkpoint-000004") == []
    (tmp_path / "checkpoint-000004" / "training_state.pt").unlink()
    assert checkpoint.foreign_files(tmp_path / "checkpoint-000004") == ["no training_state.pt"]


def test_rewriting_a_step_sets_a_checkpoint_with_user_files_aside(tmp_path, caplog):
    save_by_hand(tmp_path, 4)
    (tmp_path / "checkpoint-000004" / "README.txt").write_text("the one we sent to the paper")
    with caplog.at_level("WARNING", logger="quietstar.training.checkpoint"):
        save_by_hand(tmp_path, 4)  # a run resumed from an earlier step reaches step 4 again
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-000004.kept-")]
    assert len(kept) == 1 and (kept[0] / "README.txt").exists()
    assert not (tmp_path / "checkpoint-000004" / "README.txt").exists()
    assert f"holds files a checkpoint does not (README.txt): kept as {kept[0].name}" in caplog.text


def test_a_training_run_keeps_a_checkpoint_holding_user_files(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_in_process(train_args(tiny_model_dir, out, "--max-steps", "1"))
    (out / "checkpoint-000001" / "eval").mkdir()
    run_in_process(train_args(tiny_model_dir, out, "--max-steps", "3", "--checkpoint-every", "1",
                              "--keep-checkpoints", "1", "--resume", "latest"))
    assert (out / "checkpoint-000001" / "eval").is_dir()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-000001", "checkpoint-000003"]
    assert f"kept {out / 'checkpoint-000001'} (beyond --keep-checkpoints 1)" in (out / "train.log").read_text()
