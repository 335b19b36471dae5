"""Two CPU processes (DDP over gloo, launched by torchrun) train exactly what one process does.

With the same global batch (2 sequences) and micro-batch size (1), one process accumulates two
micro-batches while two processes take one each and average their gradients. Each micro-batch
samples its thoughts from a generator seeded by (seed, step, global sequence index), so both
runs see the same sequences and the same thoughts, and end with the same weights up to the
rounding of a different summation order.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import make_lm, make_tokenizer

from quietstar.checkpoint import checkpoint_name
from quietstar.metrics import read_metrics
from quietstar.train import TrainConfig, train

STEPS = 4


def settings(model_dir, out) -> dict:
    return dict(model=str(model_dir), output_dir=str(out), seq_len=16, batch_size=2,
                micro_batch_size=1, max_steps=STEPS, learning_rate=1e-3, warmup_steps=1,
                eval_every=0, sample_every=0, num_documents=40, checkpoint_every=STEPS,
                quietstar={"sampled_thought_tokens": 2, "ahead_tokens": 2})


def as_flags(values: dict) -> list[str]:
    values = dict(values)
    method = values.pop("quietstar")
    flags = []
    for key, value in {**values, **method}.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model = out / checkpoint_name(STEPS) / "model"
    return load_file(model / "model.safetensors") | load_file(model / "quietstar_head.safetensors")


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_match_one_process_with_accumulation(tmp_path):
    model_dir = tmp_path / "tiny"
    make_lm("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "quietstar.train", *as_flags(settings(model_dir, tmp_path / "two"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "on 2 x cpu" in two.stderr  # it really ran as two processes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig.from_dict(settings(model_dir, tmp_path / "one")))
    finally:
        torch.set_num_threads(threads)

    one_w, two_w = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one_w.keys() == two_w.keys()
    moved = 0
    initial = make_lm("llama").state_dict()
    for key in one_w:
        torch.testing.assert_close(two_w[key], one_w[key], rtol=1e-4, atol=1e-6, msg=key)
        moved += key in initial and not torch.equal(one_w[key], initial[key])
    assert moved > 0  # training did change the weights
    one_m = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two_m = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two_m] == list(range(1, STEPS + 1))
    for a, b in zip(one_m, two_m):  # metrics are averaged over processes like over micro-batches
        assert b["base_nll"] == pytest.approx(a["base_nll"], rel=1e-5)
        assert b["mixed_nll_2"] == pytest.approx(a["mixed_nll_2"], rel=1e-5)
