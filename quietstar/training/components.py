"""The components a training run is set up from (the recipe in ``quietstar.training.recipe`` uses them):
the model (fp32 master weights, LoRA, activation checkpointing) and its fingerprint, the training
batches and the held-out batches, the held-out loss, and the generator of each micro-batch's
thoughts."""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from quietstar.method.config import QUIETSTAR_CONFIG_NAME
from quietstar.method.controls import shifted_thoughts
from quietstar.method.targets import training_targets
from quietstar.data.corpora import TokenBatches, default_heldout, heldout_split, load_texts
from quietstar.models.modeling import QuietStarForCausalLM
from quietstar.models.saved_model import load_head
from quietstar.training.config import TrainConfig
from quietstar.utils.errors import MissingDependencyError, QuietStarInputError


def thought_generator(seed: int, step: int, sample_index: int,
                      device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that samples the thoughts of the micro-batch starting at global sequence
    ``sample_index`` of optimiser step ``step``, seeded from (seed, step, sample_index). So the
    thoughts do not depend on how a step is split over processes (with the same
    ``micro_batch_size``, one process with gradient accumulation samples exactly what N processes
    do), and a resumed run samples exactly what the uninterrupted one would have: the generator
    needs no saved state."""
    digest = hashlib.sha256(f"quietstar-thoughts:{seed}:{step}:{sample_index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _apply_lora(model: QuietStarForCausalLM, config: TrainConfig) -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise MissingDependencyError("--lora-rank needs peft: pip install peft (or pip install quietstar[lora])") from e
    targets: str | list[str] = config.lora_target_modules.strip()
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=targets)
    try:
        with warnings.catch_warnings():  # peft calls a transformers name deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model.lm = get_peft_model(model.lm, lora)
    except ValueError as e:
        raise QuietStarInputError(f"LoRA could not be applied to {config.model} ({e}); check "
                                  "--lora-target-modules") from None


def build_model(config: TrainConfig) -> QuietStarForCausalLM:
    """The base model in fp32 (the master weights), wrapped, with LoRA / checkpointing if asked."""
    from quietstar.models.loading import load_base_model

    lm, tokenizer = load_base_model(config.model, dtype=torch.float32, revision=config.revision,
                                    cache_dir=config.cache_dir)
    if tokenizer.pad_token is None:  # padding is masked out of the loss; any token will do
        tokenizer.pad_token = tokenizer.eos_token
    # A saved QuietStar model as the base: its tokenizer holds the meta tokens already, and
    # training continues from its learned START/END vectors and mixing head (not fresh ones).
    saved = (Path(config.model).expanduser() / QUIETSTAR_CONFIG_NAME).is_file()
    model = QuietStarForCausalLM.from_base(lm, tokenizer, config.quietstar, saved_tokenizer=saved)
    if saved:
        try:
            load_head(model, Path(config.model).expanduser())
        except QuietStarInputError as e:
            raise QuietStarInputError(f"{config.model} is a saved QuietStar model, and training continues from its "
                                      f"START/END vectors and mixing head, which do not fit these settings ({e}): "
                                      "keep its mixing_head_hidden_size, or start from its plain LM") from None
    model._no_split_modules = getattr(lm, "_no_split_modules", None)  # FSDP auto-wrap reads it
    if config.lora_rank:
        _apply_lora(model, config)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model


def model_fingerprint(model: QuietStarForCausalLM, config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed into this model."""
    text = model.lm.config.get_text_config()
    return {"model_type": text.model_type, "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
            "lora_rank": config.lora_rank}


def build_data(config: TrainConfig, tokenizer):
    """(training TokenBatches of global batches, held-out micro-batches for evaluation)."""
    texts = load_texts(config.data, split=config.data_split, text_field=config.text_field,
                       seed=config.seed, num_documents=config.num_documents)
    heldout_batches: list[dict[str, torch.Tensor]] = []
    if config.eval_every:
        heldout, texts = heldout_split(texts, config.eval_documents)
        if config.eval_documents is not None and len(heldout) < config.eval_documents:
            raise QuietStarInputError(f"the data {config.data!r} has only {len(heldout)} documents, all taken "
                                      f"for evaluation (--eval-documents {config.eval_documents}); leave "
                                      f"--eval-documents unset (a tenth: {default_heldout(heldout)} here), give a "
                                      "smaller one, use more data, or --eval-every 0")
        held = TokenBatches(heldout, tokenizer, config.seq_len, config.micro_batch_size,
                            mode=config.data_mode, shuffle=False, epochs=1,
                            name=f"held-out part of {config.data!r}")
        heldout_batches = list(itertools.islice(held, config.eval_batches))
        if len(heldout_batches) < config.eval_batches:
            raise QuietStarInputError(f"the {len(heldout)} held-out documents give only "
                                      f"{len(heldout_batches)} of --eval-batches {config.eval_batches} "
                                      "batches; raise --eval-documents or lower --eval-batches")
    batches = TokenBatches(texts, tokenizer, config.seq_len, config.batch_size,
                           mode=config.data_mode, seed=config.seed,
                           name=f"training data {config.data!r}")
    return batches, heldout_batches


class EvalHook(Protocol):
    """Called every ``eval_every`` steps (and at the end) on every process, with the model in
    eval mode under ``torch.no_grad()``; returns metrics named ``"eval/..."``, logged with the
    step. Pass extra hooks to ``train(config, eval_hooks=[...])``."""

    def __call__(self, model: QuietStarForCausalLM, step: int) -> dict[str, float]: ...


class HeldoutLoss:
    """Held-out next-token NLL without a thought (the base model) and with one (mixed).

    Thoughts are sampled with fixed generators, so every evaluation of the same weights gives
    the same numbers and successive evaluations differ only by training.
    """

    # "with thought": what the model predicts, mixed where it thinks (all positions at
    # thought_fraction 1), base elsewhere; so both numbers cover the same tokens.
    NAMES = {"base_nll": "eval/nll_without_thought", "model_nll": "eval/nll_with_thought",
             "thought_gain": "eval/thought_gain"}

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]], seed: int, *, own_minus_shifted: bool = False):
        """``own_minus_shifted``: also "eval/own_minus_shifted" (``own_minus_shifted``)."""
        self.batches, self.seed, self.own_minus_shifted = list(batches), seed, own_minus_shifted

    def __call__(self, model: QuietStarForCausalLM, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        sums = dict.fromkeys(self.NAMES, 0.0)
        shifted = 0.0
        for i, batch in enumerate(self.batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                        generator=thought_generator(self.seed, -1, i, device), check_finite=False)
            for key in sums:
                sums[key] += out.metrics[key].item()
            if self.own_minus_shifted:
                shifted += own_minus_shifted(model, batch, out, thought_generator(self.seed, -2, i, device))
        metrics = {name: sums[key] / len(self.batches) for key, name in self.NAMES.items()}
        if self.own_minus_shifted:
            metrics["eval/own_minus_shifted"] = shifted / len(self.batches)
        return metrics


def own_minus_shifted(model: QuietStarForCausalLM, batch: dict[str, torch.Tensor], out, generator) -> float:
    """Mean over the positions that thought in ``out`` (the model's output on ``batch``) of the
    NLL of x_{i+1} after the position's own first thought minus after the thought of the thinking
    position half the row's thinking positions further on (``method.controls.shifted_thoughts``,
    sampled from ``generator``), both scored
    alike (``score_thoughts``). Below 0: the model's own thoughts say something useful here."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets, valid = training_targets(ids, mask, batch["labels"], 1)
    positions = out.thought_positions
    own = out.thought_ids[:, 0]                                               # [B, L, k]
    shifted = shifted_thoughts(model, ids, mask, num_tokens=own.shape[-1], generator=generator,
                               thought_positions=positions)
    counted = valid[..., 0] if positions is None else valid[..., 0] & positions
    nll = []
    for thoughts in (own, shifted):
        logits = model.score_thoughts(ids, thoughts, mask, positions, steps=1).mixed_logits[:, :, 0]
        nll.append(torch.nn.functional.cross_entropy(logits[counted].float(), targets[..., 0][counted],
                                                     reduction="none"))
    return (nll[0] - nll[1]).mean().item() if counted.any() else 0.0
