"""QuietStarTrainer: the same model, loss and metrics inside transformers' Trainer; saving in
the QuietStar format; resuming continues the run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_script, make_model, random_text
from quietstar import QuietStarForCausalLM
from quietstar.training.hf_trainer import QuietStarTrainer, QuietStarTrainingArguments


def dataset(n=8, length=12):
    ids = random_text(n, length, seed=5)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def trainer_for(tmp_path, max_steps=4, **kw):
    args = QuietStarTrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0,
        lr_scheduler_type="constant", save_only_model=False, **kw)
    model = make_model("llama", thoughts_per_position=2, policy_loss_weight=10.0, reward_source="thought")
    return QuietStarTrainer(model=model, args=args, train_dataset=dataset())


def test_trainer_logs_the_quietstar_metrics_and_keeps_the_optimiser_groups(tmp_path):
    trainer = trainer_for(tmp_path / "run", max_steps=3, mixing_head_lr_multiplier=30.0, weight_decay=0.1)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 3
    for record in logged:
        for name in ("base_nll", "mixed_nll", "mixed_nll_1", "policy_loss", "mean_reward",
                     "positive_reward_fraction", "reward_spread", "thought_gain", "mean_mixing_weight"):
            assert name in record and record[name] == record[name], name
    head = {id(p) for p in trainer.model.mixing_head.parameters()}
    meta = trainer.model.embedding.scaled_vectors
    for group in trainer.optimizer.param_groups:
        is_head = {id(p) in head for p in group["params"]}
        assert len(is_head) == 1
        assert group["initial_lr"] == pytest.approx(1e-3 * (30.0 if is_head.pop() else 1.0))
        if any(p is meta for p in group["params"]):
            assert group["weight_decay"] == 0.0  # the START/END vectors are never decayed
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.0, 0.1}


def test_trainer_saves_the_quietstar_format_and_resumes(tmp_path):
    whole = trainer_for(tmp_path / "whole")
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    assert (checkpoint / "quietstar_head.safetensors").is_file() and not (checkpoint / "training_args.bin").exists()
    assert json.loads((checkpoint / "training_args.json").read_text())["max_steps"] == 4
    reloaded = QuietStarForCausalLM.from_pretrained(checkpoint)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key

    first = trainer_for(tmp_path / "parts", max_steps=4)
    first.args.max_steps = 2  # stop after the step-2 checkpoint, as an interrupted run would
    first.train()
    resumed = trainer_for(tmp_path / "parts", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_trainer_refuses_a_plain_model():
    from conftest import make_lm

    with pytest.raises(TypeError, match="wrap the LM with QuietStarForCausalLM.from_base"):
        QuietStarTrainer(model=make_lm(), args=QuietStarTrainingArguments(output_dir="unused", use_cpu=True))


def test_example_script_trains_saves_and_reloads(tiny_model_dir, tmp_path):
    example = load_script("examples/trainer.py")
    out = example.main(["--model", str(tiny_model_dir), "--max-steps", "2", "--seq-len", "16",
                        "--output-dir", str(tmp_path / "run")])
    model = QuietStarForCausalLM.from_pretrained(out)
    assert model.config.sampled_thought_tokens == 4
    from quietstar.training.config import load_config

    assert model.config == load_config("cpu-demo").quietstar  # the preset's method, as it says
    assert (tmp_path / "run" / "checkpoint-2" / "quietstar_head.safetensors").is_file()
