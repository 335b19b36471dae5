"""QuietStarTrainer: the same model, loss and metrics inside transformers' Trainer; saving in
the QuietStar format; resuming continues the run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from conftest import load_script, make_model, random_text
from quietstar import QuietStarForCausalLM
from quietstar.training.hf_trainer import QuietStarTrainer, QuietStarTrainingArguments
from quietstar.utils.errors import QuietStarInputError


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


class GradientsBeforeTheStep(TrainerCallback):
    """The gradients the optimiser step reads (Trainer zeroes them after it)."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {name: p.grad.clone() for name, p in self.model.named_parameters() if p.grad is not None}


def one_rlp_sgd_step(tmp_path, tokens: int, accumulation: int, monkeypatch):
    """(the weights before and after one SGD step of QuietStarTrainer with rlp, the gradients it
    read, the thought groups scored). The thoughts come from the global generator, which Trainer
    seeds: both paths draw the same."""
    from quietstar import QuietStarConfig
    from quietstar.method.rollout import Rollout
    from conftest import make_lm, make_tokenizer

    config = QuietStarConfig(objective="rlp", sampled_thought_tokens=3, ahead_tokens=2, thoughts_per_position=2,
                             thought_temperature=0.7)
    model = QuietStarForCausalLM.from_base(make_lm("llama"), make_tokenizer(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an EMA copy apart from the LM, so the rewards are not trivial
        model.ema_baseline_enable()
        for p in model.ema_lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    groups = []
    original = Rollout.score_rows
    monkeypatch.setattr(Rollout, "score_rows", lambda self, *a, **k: groups.append(1) or original(self, *a, **k))
    args = QuietStarTrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        optim="sgd", learning_rate=0.1, weight_decay=0.0, lr_scheduler_type="constant", report_to=[], use_cpu=True,
        seed=0, data_seed=0, save_strategy="no", thought_tokens_per_backward=tokens)
    grads = GradientsBeforeTheStep(model)
    QuietStarTrainer(model=model, args=args, train_dataset=dataset(), callbacks=[grads]).train()
    after = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return before, after, grads.grads, len(groups)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_grouped_rlp_step_gives_the_one_graph_weights(tmp_path, monkeypatch, accumulation):
    """thought_tokens_per_backward (groups of 3 positions: 2 texts x 2 thoughts x 6 passes x 3 = 72
    tokens, 4 groups per micro-batch) gives the optimiser the gradients, and the step the weights,
    of one graph, gradient accumulation's 1/steps scaling of the held gradients included. (rlp:
    random text gives rpt no reward, hence no update; test_grouped_backward.py checks rpt's step.)"""
    w0, one, want, _ = one_rlp_sgd_step(tmp_path / "one", 0, accumulation, monkeypatch)
    _, grouped, got, groups = one_rlp_sgd_step(tmp_path / "grouped", 72, accumulation, monkeypatch)
    assert groups == 4 * accumulation
    assert got.keys() == want.keys() and any(g.abs().max() > 1e-4 for g in want.values()), "no gradient"
    for name, g in want.items():  # fp32 sums in another order: ~2e-5 of a parameter's largest gradient
        scale = g.abs().max().item()
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-4 * scale, msg=name)
        # the SGD step (lr 0.1) applied them: the same weights, up to rounding of weights near 1
        torch.testing.assert_close(grouped[name], one[name], rtol=0, atol=0.1 * 1e-4 * scale + 1e-7, msg=name)
        assert not torch.equal(one[name], w0[name]) or scale == 0, name


def test_a_negative_thought_token_budget_is_refused():
    with pytest.raises(QuietStarInputError, match="thought_tokens_per_backward must be an int >= 0, got -1; use 0"):
        QuietStarTrainingArguments(output_dir="unused", use_cpu=True, thought_tokens_per_backward=-1)


def test_trainer_activation_checkpointing_trains_as_without(tmp_path):
    """Trainer's activation_checkpointing reaches the LM (with Trainer's arguments) and changes no
    weight: recomputing the layers in the backward is exact."""
    weights = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        trainer = trainer_for(tmp_path / str(checkpointing), max_steps=1, save_strategy="no",
                              activation_checkpointing=checkpointing)
        trainer.train()
        assert trainer.model.lm.is_activation_checkpointing == checkpointing
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for key, value in weights[0].items():
        # Adam's step is ~lr = 1e-3 per weight; recomputation changes float32 sums only (~2e-6 seen)
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=1e-5, msg=key)
