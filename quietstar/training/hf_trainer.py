"""``QuietStarTrainer``: Quiet-STaR inside a ``transformers.Trainer`` pipeline.

For people who already train with ``Trainer``: swap the class and wrap the model,

    model = QuietStarForCausalLM.from_base(lm, tokenizer, QuietStarConfig(...))
    trainer = QuietStarTrainer(model=model, args=QuietStarTrainingArguments(output_dir="out", ...),
                               train_dataset=tokenized, data_collator=collator)
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

It runs the same model forward, loss and metrics as ``quietstar train`` (no second copy of the
objective): the loss is ``model(input_ids, attention_mask, labels).loss``, and every metric of
``quietstar_loss`` (base_nll, mixed_nll, policy_loss, mean_reward, thought_gain, ...) is averaged
over the steps since the last log and logged with Trainer's own ``loss``, so ``report_to`` gets
them too. For rlp / rpt a training step scores the thoughts in groups of positions
(``thought_tokens_per_backward``, as ``quietstar train``): the same gradients at less memory and
time, gradient accumulation's loss scaling included. The optimiser groups are
``quietstar.training.optim.parameter_groups`` (no decay on the START/END vectors, whose 100x
learning rate comes from their parameterisation; the mixing head at
``mixing_head_lr_multiplier``); checkpoints and ``save_model`` go through
``QuietStarForCausalLM.save_pretrained`` and resuming loads them back into the model.

``quietstar train`` stays the recommended path: it adds what Trainer has no place for
(per-micro-batch thought generators that make sampling independent of the process count,
policy and NLL gradients clipped apart, the EMA baseline's checkpointing, atomic checkpoints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from quietstar.training.checkpoint import load_model_weights
from quietstar.training.config import TrainConfig
from quietstar.models.modeling import QuietStarForCausalLM
from quietstar.training.optim import parameter_groups
from quietstar.utils.errors import QuietStarInputError


@dataclass
class QuietStarTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the settings of quietstar's optimiser groups and of its
    training forward."""

    mixing_head_lr_multiplier: float = field(default=1.0, metadata={
        "help": "The mixing head's learning rate is learning_rate times this (1.0: the paper)."})
    thought_tokens_per_backward: int = field(default=TrainConfig.thought_tokens_per_backward, metadata={  # one default
        "help": "rlp / rpt: the thoughts are sampled without gradients, the text pass runs once per sequence, and "
                "the thoughts are scored and differentiated a group of positions at a time, each group's thought "
                "passes about this many tokens (at least one position): the same gradients as one backward, with "
                "the memory of the text pass plus one group's thoughts. 0: all thoughts in one graph (more "
                "memory). Not used by the quietstar objective, in evaluation (no gradients), nor with activation "
                "checkpointing. As quietstar train's --thought-tokens-per-backward."})

    def __post_init__(self):
        super().__post_init__()
        if not self.mixing_head_lr_multiplier > 0:
            raise QuietStarInputError(f"mixing_head_lr_multiplier must be > 0, got {self.mixing_head_lr_multiplier}")
        tokens = self.thought_tokens_per_backward
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise QuietStarInputError(f"thought_tokens_per_backward must be an int >= 0, got {tokens!r}; use 0 for "
                                      "one graph of every thought, or a token count per group (default "
                                      f"{TrainConfig.thought_tokens_per_backward})")


class QuietStarTrainer(Trainer):
    """``Trainer`` for a ``QuietStarForCausalLM`` (see the module docstring)."""

    # compute_loss returns the micro-batch's mean loss (not a sum over num_items_in_batch), so
    # Trainer divides it by the accumulation steps before backward; the grouped rlp / rpt step's
    # held gradients are scaled by that backward's incoming gradient, like the rest.
    loss_is_scaled_for_ga = False

    def __init__(self, model: QuietStarForCausalLM, args: TrainingArguments | None = None, **kwargs):
        if not isinstance(model, QuietStarForCausalLM):
            raise TypeError(f"QuietStarTrainer trains a QuietStarForCausalLM, got {type(model).__name__}; "
                            "wrap the LM with QuietStarForCausalLM.from_base(lm, tokenizer, config)")
        if getattr(model.lm, "peft_config", None):
            raise QuietStarInputError("QuietStarTrainer does not save LoRA adapters yet; use quietstar train "
                                      "--lora-rank for LoRA")
        # Trainer aligns a given tokenizer's special tokens with ``model.config``, which it takes
        # for a transformers config; the model's config is the method's. The model saves its own
        # tokenizer (with the meta tokens), so none is passed on.
        tokenizer = kwargs.pop("processing_class", None)
        if tokenizer is not None and tokenizer is not model.tokenizer:
            raise QuietStarInputError("pass no processing_class, or the model's own tokenizer (model.tokenizer, "
                                      "which holds the thought tokens); the model saves it with itself")
        super().__init__(model=model, args=args, **kwargs)
        vars(model.config).pop("use_cache", None)  # Trainer sets it on any model.config
        self._metric_sums: dict[str, float] = {}
        self._metric_count = 0

    # ------------------------------------------------------------------ the objective
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # grouped only when training: evaluation has no gradients to hold (forward scores in one pass)
        tokens = getattr(self.args, "thought_tokens_per_backward",
                         QuietStarTrainingArguments.thought_tokens_per_backward) if model.training else 0
        out = model(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"),
                    check_finite=False, thought_tokens_per_backward=tokens)
        if model.training:
            for name, value in out.metrics.items():
                self._metric_sums[name] = self._metric_sums.get(name, 0.0) + float(value)
            self._metric_count += 1
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's record with the quietstar metrics averaged over the micro-batches since the
        last log (on the main process: other processes' metrics are not gathered)."""
        if self._metric_count and "loss" in logs:
            logs = {**logs, **{name: total / self._metric_count for name, total in self._metric_sums.items()}}
            self._metric_sums, self._metric_count = {}, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ optimiser
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.accelerator.unwrap_model(self.model if model is None else model)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = parameter_groups(model, self.args.learning_rate, self.args.weight_decay,
                                      getattr(self.args, "mixing_head_lr_multiplier", 1.0))
            for group in groups:
                group.pop("lr_scale")  # Trainer's scheduler scales each group's own initial lr
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ saving and resuming
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The model in the ``save_pretrained`` format (Trainer's fallback for a plain module
        writes a bare state dict, which breaks on tied embeddings), and the training arguments
        as JSON."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        # JSON, not Trainer's pickled training_args.bin: nothing here needs unpickling to reload
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_model_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint,
                           model_dir=".")
