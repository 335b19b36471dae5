"""Training: ``quietstar train`` and the ``train(TrainConfig)`` API behind it.

One loop from a laptop CPU to a GPU cluster (it runs as is under ``accelerate launch`` /
``torchrun`` with DDP, FSDP2 or DeepSpeed ZeRO):

    config = load_config("examples/train.yaml", {"max_steps": 100})
    result = train(config)            # -> TrainResult(output_dir, checkpoint, ...)

The configuration is two typed dataclasses, ``TrainConfig`` and the method's ``QuietStarConfig``
(its ``quietstar`` field). They are the one source of truth: the command-line flags, their help
and defaults are generated from their fields and docstrings, a YAML file uses the same names, and
the resolved configuration is saved with the run and with every checkpoint.

Batches. ``batch_size`` is the *global* number of sequences per optimiser step; each process runs
``micro_batch_size`` of them per forward pass, accumulating gradients over
``batch_size / (micro_batch_size * processes)`` passes. Global sequence j of step s is always
the same sequence, whatever the number of processes.

Thought sampling is random. Each micro-batch samples its thoughts with its own ``torch.Generator``
seeded from (seed, step, global index of its first sequence) (``thought_generator``). So the
thoughts do not depend on how a step is split over processes (with the same
``micro_batch_size``, one process with gradient accumulation samples exactly what N processes
do), and a resumed run samples exactly what the uninterrupted one would have: the generator needs
no saved state.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import yaml

from . import checkpoint
from .arguments import merge, read_yaml
from .config import QuietStarConfig
from .cpu import tune_for_training
from .metrics import (
    CURVES_NAME,
    METRICS_NAME,
    REPORT_TO,
    SAMPLES_MD,
    MetricsLogger,
    SampleWriter,
    format_sample,
    plot_training_curves,
    thought_samples,
)
from .modeling import QuietStarForCausalLM
from .models import EMBEDDED_MODEL

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "train_config.yaml"


def _default_method_config() -> QuietStarConfig:
    # Short thoughts, so the default run fits a few minutes on a laptop CPU. Policy weight 100
    # instead of the paper's 1e6: with fp32 master weights and clipping at 1.0, 1e6 makes the
    # REINFORCE gradient (norm ~1e4) ~99.9% of every update and the NLL stops falling
    # (docs/results/runs.md, pilot-0); at 100 the held-out NLL of the default run falls.
    return QuietStarConfig(sampled_thought_tokens=4, ahead_tokens=4, thoughts_per_position=2,
                           policy_loss_weight=100.0)


@dataclass
class TrainConfig:
    """Everything a training run needs; the method's own settings live in ``quietstar``.

    The defaults train the embedded SmolLM2-135M-Instruct for a few minutes on two CPU cores.
    """

    model: str = EMBEDDED_MODEL
    """Base model: a Hugging Face model id, a local model folder, or the embedded
    "embedded:smollm2-135m-instruct" (converted once to a cached safetensors folder)."""

    data: str = "builtin:arithmetic"
    """Training text: "builtin:arithmetic" (offline), a local .txt/.jsonl/.json/.parquet file or
    folder, or a Hugging Face dataset "name" or "name:config" (streamed)."""

    data_split: str = "train"
    """Split of a Hugging Face dataset."""

    text_field: str | None = None
    """Record field holding the text (default "text"; question/answer records are joined)."""

    num_documents: int | None = None
    """Use only the first this many documents (None: all; the built-in corpus makes 2000)."""

    data_mode: Literal["pack", "crop"] = "pack"
    """"pack": documents joined with EOS and cut into seq_len windows. "crop": one document per
    sequence, cut or padded to seq_len (padding is masked out of the loss)."""

    output_dir: str | None = None
    """Run folder for checkpoints, metrics, curves and samples (None: runs/quietstar-<time>)."""

    seq_len: int = 32
    """Tokens per training sequence; a thought is sampled after every one of them."""

    batch_size: int = 1
    """Sequences per optimiser step, over all processes and accumulation steps."""

    micro_batch_size: int = 1
    """Sequences per forward pass and process; batch_size / (micro_batch_size * processes)
    passes are accumulated per step."""

    max_steps: int = 20
    """Optimiser steps of the whole run (a resumed run continues up to this)."""

    learning_rate: float = 3e-5
    """Peak AdamW learning rate (fp32 master weights). START/END embeddings learn
    meta_token_lr_multiplier times faster through their parameterisation."""

    mixing_head_lr_multiplier: float = 1.0
    """The mixing head's learning rate is learning_rate times this. The head starts at w = 0 and
    at the LM's small learning rate its weight grows slowly; 1.0 is the paper's setting."""

    weight_decay: float = 0.001
    """AdamW weight decay of matrices; biases, norms and the START/END embeddings get none."""

    warmup_steps: int = 2
    """Steps of linear warm-up from learning_rate / (warmup_steps + 1) to learning_rate."""

    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up, down to min_lr_ratio * learning_rate at max_steps."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of learning_rate (cosine and linear schedules)."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (inf: no clipping). With the policy-loss weight of
    1e6 the gradient is mostly the REINFORCE term, so clipping sets the step size."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision; weights and optimiser state stay fp32. "auto": bf16 autocast on CUDA
    GPUs that support it, fp32 elsewhere."""

    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: much less memory, ~30% more time."""

    lora_rank: int = 0
    """LoRA rank for the base model's linear layers (peft); 0 trains all weights. The mixing
    head and START/END embeddings are always fully trained."""

    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)."""

    lora_target_modules: str = "all-linear"
    """Comma-separated module names to adapt with LoRA, or "all-linear" (every linear layer but
    the LM head)."""

    seed: int = 0
    """Seed of everything random: initialisation, data order and thought sampling."""

    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and always at the end)."""

    keep_checkpoints: int = 2
    """Keep only the newest this many checkpoints."""

    resume: str | None = None
    """Continue a run: a checkpoint folder, a run folder (its latest checkpoint), or "latest"
    (in output_dir). Settings not given again are taken from the checkpoint."""

    sample_every: int = 5
    """Show and save sampled thoughts every this many steps (0: never)."""

    eval_every: int = 10
    """Held-out loss with and without thoughts every this many steps and at the end (0: never)."""

    eval_batches: int = 2
    """Held-out batches of micro_batch_size sequences per evaluation."""

    eval_documents: int = 100
    """Documents at the start of the data held out for evaluation (never trained on)."""

    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also send the metrics to TensorBoard (<output_dir>/tensorboard) or Weights & Biases;
    metrics.jsonl is always written."""

    max_nonfinite_steps: int = 3
    """Stop (after saving) when this many steps in a row have a NaN/inf loss or gradient; such
    steps are skipped."""

    quietstar: QuietStarConfig = field(default_factory=_default_method_config)
    """The method's settings (thought length, ahead tokens, loss weights, ...)."""

    def __post_init__(self) -> None:
        if isinstance(self.quietstar, dict):
            self.quietstar = _method_config(self.quietstar)

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

        for name in ("seq_len", "batch_size", "micro_batch_size", "max_steps", "checkpoint_every",
                     "keep_checkpoints", "eval_batches", "eval_documents", "max_nonfinite_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "sample_every", "eval_every", "lora_rank", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        need(self.num_documents is None or self.num_documents >= 1,
             f"num_documents must be None or >= 1, got {self.num_documents!r}")
        need(self.batch_size % self.micro_batch_size == 0,
             f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
             f"{self.micro_batch_size}; make batch_size = micro_batch_size * processes * "
             "accumulation steps")
        need(self.seq_len >= self.quietstar.ahead_tokens + 1,
             f"seq_len {self.seq_len} must exceed ahead_tokens {self.quietstar.ahead_tokens}: every "
             "thought is trained to predict that many true tokens")
        need(self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning_rate must be finite and > 0, got {self.learning_rate!r}")
        need(self.mixing_head_lr_multiplier > 0 and math.isfinite(self.mixing_head_lr_multiplier),
             f"mixing_head_lr_multiplier must be finite and > 0, got {self.mixing_head_lr_multiplier!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0 (inf: no clipping), got "
             f"{self.max_grad_norm!r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        need(bool(self.lora_target_modules.strip()), "lora_target_modules must not be empty")
        for name, allowed in (("data_mode", ("pack", "crop")),
                              ("lr_schedule", ("cosine", "linear", "constant")),
                              ("precision", ("auto", "fp32", "bf16")), ("report_to", REPORT_TO)):
            value = getattr(self, name)
            need(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            method = {f.name for f in fields(QuietStarConfig)}
            hint = [f"{u} belongs under 'quietstar:'" for u in unknown if u in method]
            raise ValueError(f"unknown training setting(s) {unknown}"
                             + (f" ({'; '.join(hint)})" if hint else "")
                             + f"; known: {sorted(known)}")
        if isinstance(data.get("quietstar"), dict):
            data["quietstar"] = _method_config(data["quietstar"])
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _method_config(values: dict[str, Any]) -> QuietStarConfig:
    """A QuietStarConfig from the training defaults, updated with ``values``."""
    return QuietStarConfig.from_dict({**_default_method_config().to_dict(), **values})


@dataclass
class TrainResult:
    """What ``train`` returns."""

    output_dir: Path
    checkpoint: Path | None   # the last checkpoint written
    step: int                 # optimiser steps done
    metrics: dict[str, Any]   # the last step's record
    interrupted: bool         # stopped by Ctrl-C / SIGTERM (after saving)
    elapsed_s: float


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last good weights was saved."""


# ============================================================================ configuration
def load_config(config_file: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The resolved configuration: defaults < the resumed checkpoint's saved config < the YAML
    ``config_file`` < ``overrides`` (``{"seq_len": 32, "quietstar": {"ahead_tokens": 2}}``)."""
    explicit = merge(read_yaml(config_file) if config_file else {}, overrides or {})
    base: dict[str, Any] = {}
    if explicit.get("resume"):
        found = checkpoint.resolve_resume(explicit["resume"], explicit.get("output_dir"))
        saved = found / checkpoint.CONFIG_NAME
        if saved.exists():
            base = read_yaml(saved)
            base["output_dir"] = str(found.parent)  # robust to a moved run folder / another cwd
    return TrainConfig.from_dict(merge(base, explicit))


# ============================================================================ pieces of the loop
def thought_generator(seed: int, step: int, sample_index: int,
                      device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that samples the thoughts of the micro-batch starting at global sequence
    ``sample_index`` of optimiser step ``step`` (see the module docstring)."""
    digest = hashlib.sha256(f"quietstar-thoughts:{seed}:{step}:{sample_index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then the schedule."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if config.lr_schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, config.max_steps - warmup)
    floor = peak * config.min_lr_ratio
    if config.lr_schedule == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: QuietStarForCausalLM, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. Matrices are decayed; biases, norm weights and the
    START/END embeddings (stored scaled down, where decay would act 100x too strongly) are not.
    Groups: LM decayed, LM not decayed, head decayed, head not decayed; each group's ``lr_scale``
    multiplies the scheduled learning rate (the head's is ``mixing_head_lr_multiplier``)."""
    meta = model.embedding.scaled_vectors
    head = {id(p) for p in model.mixing_head.parameters()}
    groups = [[], [], [], []]
    for p in model.parameters():
        if p.requires_grad:
            groups[2 * (id(p) in head) + (p.dim() < 2 or p is meta)].append(p)
    scales = (1.0, 1.0, config.mixing_head_lr_multiplier, config.mixing_head_lr_multiplier)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if i % 2 else config.weight_decay,
          "lr_scale": scale, "lr": config.learning_rate * scale}
         for i, (params, scale) in enumerate(zip(groups, scales))],
        lr=config.learning_rate)


def _apply_lora(model: QuietStarForCausalLM, config: TrainConfig) -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("--lora-rank needs peft: pip install peft (or pip install quietstar[lora])") from e
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
        raise ValueError(f"LoRA could not be applied to {config.model} ({e}); check "
                         "--lora-target-modules") from None


def build_model(config: TrainConfig) -> QuietStarForCausalLM:
    """The base model in fp32 (the master weights), wrapped, with LoRA / checkpointing if asked."""
    from .models import load_base_model

    lm, tokenizer = load_base_model(config.model, dtype=torch.float32)
    if tokenizer.pad_token is None:  # padding is masked out of the loss; any token will do
        tokenizer.pad_token = tokenizer.eos_token
    model = QuietStarForCausalLM.from_base(lm, tokenizer, config.quietstar)
    model._no_split_modules = getattr(lm, "_no_split_modules", None)  # FSDP auto-wrap reads it
    if config.lora_rank:
        _apply_lora(model, config)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model


def _build_model_whole(config: TrainConfig, accelerator) -> QuietStarForCausalLM:
    """DeepSpeed: ``build_model`` with every process loading the whole base model.

    accelerate's DeepSpeed plugin registers its config with transformers even when
    zero3_init_flag is false, and under ZeRO-3 transformers then partitions the weights while
    loading (deepspeed.zero.Init). QuietStarForCausalLM.from_base reads the embedding matrix (the
    START/END initial vectors), which a partitioned parameter does not hold. ``accelerator.prepare``
    partitions the finished model.
    """
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        return build_model(config)
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def _shard_lm_embedding(model: QuietStarForCausalLM, accelerator) -> None:
    """FSDP2: makes the LM's input embedding (with the output head when tied to it) one FSDP unit.

    accelerate's FSDP2 preparation shards ``model.get_input_embeddings()`` as a unit of its own,
    which here is the MetaTokenEmbedding: it holds the LM's embedding module, which is also a
    child of the LM, so the root unit would take the already sharded weight a second time and
    ``fully_shard`` fails. Made an FSDP unit first, the embedding is skipped by both, and the
    MetaTokenEmbedding unit keeps only the START/END vectors. A tied head must be in the same
    unit: sharding the embedding alone would replace its weight and silently untie the head.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    mesh = accelerator.torch_device_mesh
    embed, head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    # The same settings as accelerate gives the units it makes (fsdp2_prepare_model).
    fully_shard([embed, head] if head.weight is embed.weight else embed,
                reshard_after_forward=plugin.reshard_after_forward, offload_policy=plugin.cpu_offload,
                mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
                mesh=mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None)


class _Remaining:
    """The documents after the first ``skip``, minus any equal to a held-out one (re-iterable)."""

    def __init__(self, texts, skip: int, exclude: set[str]):
        self.texts, self.skip, self.exclude = texts, skip, exclude

    def __iter__(self):
        return (t for t in itertools.islice(self.texts, self.skip, None) if t not in self.exclude)


def build_data(config: TrainConfig, tokenizer):
    """(training TokenBatches of global batches, held-out micro-batches for evaluation)."""
    from .data import TokenBatches, load_texts

    texts = load_texts(config.data, split=config.data_split, text_field=config.text_field,
                       seed=config.seed, num_documents=config.num_documents)
    heldout_batches: list[dict[str, torch.Tensor]] = []
    if config.eval_every:
        heldout = list(itertools.islice(texts, config.eval_documents))
        if len(heldout) < config.eval_documents:
            raise ValueError(f"the data {config.data!r} has only {len(heldout)} documents, all taken "
                             f"for evaluation (--eval-documents {config.eval_documents}); use more "
                             "data, a smaller --eval-documents, or --eval-every 0")
        texts = _Remaining(texts, len(heldout), set(heldout))
        held = TokenBatches(heldout, tokenizer, config.seq_len, config.micro_batch_size,
                            mode=config.data_mode, shuffle=False, epochs=1,
                            name=f"held-out part of {config.data!r}")
        heldout_batches = list(itertools.islice(held, config.eval_batches))
        if len(heldout_batches) < config.eval_batches:
            raise ValueError(f"the {config.eval_documents} held-out documents give only "
                             f"{len(heldout_batches)} of --eval-batches {config.eval_batches} "
                             "batches; raise --eval-documents or lower --eval-batches")
    batches = TokenBatches(texts, tokenizer, config.seq_len, config.batch_size,
                           mode=config.data_mode, seed=config.seed,
                           name=f"training data {config.data!r}")
    return batches, heldout_batches


# ----------------------------------------------------------------------------- evaluation hooks
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

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]], seed: int):
        self.batches, self.seed = list(batches), seed

    def __call__(self, model: QuietStarForCausalLM, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        base = mixed = gain = 0.0
        for i, batch in enumerate(self.batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                        generator=thought_generator(self.seed, -1, i, device), check_finite=False)
            base += out.base_nll.item()
            mixed += out.mixed_nll[0].item()
            gain += out.thought_gain.item()
        n = len(self.batches)
        return {"eval/nll_without_thought": base / n, "eval/nll_with_thought": mixed / n,
                "eval/thought_gain": gain / n}


# ----------------------------------------------------------------------------- run bookkeeping
class _StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, exit. A second
    Ctrl-C aborts at once without saving."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Stopping: finishing this step, then saving a checkpoint "
                       "(Ctrl-C again aborts without saving)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _TqdmHandler(logging.Handler):
    """Log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def _run_logging(output_dir: Path, enabled: bool):
    """INFO logs of this module to the console and ``<output_dir>/train.log`` (main process)."""
    if not enabled:
        yield
        return
    console, file = _TqdmHandler(), logging.FileHandler(output_dir / "train.log", encoding="utf-8")
    console.setFormatter(logging.Formatter("%(message)s"))
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(console)
    logger.addHandler(file)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        for handler in (console, file):
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _prepare_output_dir(path: Path, resuming: bool, rank: int) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {path} "
                              f"({e.strerror or e}); choose another --output-dir") from None
    latest = checkpoint.latest_checkpoint(path)
    if latest is not None and not resuming:
        raise ValueError(f"{path} already holds a run ({latest.name}); continue it with "
                         f"--resume latest --output-dir {path}, or choose another --output-dir")


def _fingerprint(model: QuietStarForCausalLM, config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed into this model."""
    text = model.lm.config.get_text_config()
    return {"model_type": text.model_type, "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
            "lora_rank": config.lora_rank}


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def _format_time(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _running(values: list[float], last: int = 5) -> float:
    tail = [v for v in values[-last:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else float("nan")


# ============================================================================ the loop
def train(config: TrainConfig, eval_hooks: Sequence[EvalHook] | None = None) -> TrainResult:
    """Trains ``config.model`` with Quiet-STaR; see ``TrainConfig`` for every setting.

    Raises ``TrainingDiverged`` (after saving) when ``max_nonfinite_steps`` steps in a row are
    non-finite. Ctrl-C / SIGTERM stop after the current step with a checkpoint
    (``TrainResult.interrupted``).
    """
    from accelerate import Accelerator, DistributedType, PartialState
    from accelerate.utils import broadcast_object_list, set_seed

    cfg = config
    started = time.perf_counter()
    cpu = not torch.cuda.is_available()
    world = PartialState(cpu=cpu).num_processes
    per_step = cfg.micro_batch_size * world
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by micro_batch_size "
                         f"{cfg.micro_batch_size} x {world} processes; use a batch_size that is a "
                         f"multiple of {per_step}")
    accumulation = cfg.batch_size // per_step
    # accumulate() below skips the gradient sync of all but the last micro-batch, and backward()
    # divides the loss by the number of micro-batches (DeepSpeed: its engine does both).
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=accumulation)
    rank, main = accelerator.process_index, accelerator.is_main_process
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and cfg.lora_rank:
        raise ValueError("LoRA with FSDP / DeepSpeed is not supported; use DDP (or one process) "
                         "for LoRA, or train all weights (--lora-rank 0)")

    resume_from = checkpoint.resolve_resume(cfg.resume, cfg.output_dir) if cfg.resume else None
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir)
    elif resume_from is not None:
        out_dir = resume_from.parent
    else:  # every process must agree on the name
        name = [time.strftime("quietstar-%Y%m%d-%H%M%S")]
        if world > 1:
            broadcast_object_list(name)
        out_dir = Path("runs") / name[0]
    _prepare_output_dir(out_dir, resume_from is not None, rank)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "output_dir": str(out_dir)})
    if main:
        checkpoint.remove_partial(out_dir)
        (out_dir / RUN_CONFIG_NAME).write_text(cfg.to_yaml(), encoding="utf-8")

    with _run_logging(out_dir, main):
        set_seed(cfg.seed)
        logger.info(f"Loading {cfg.model} ...")
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            model = _build_model_whole(cfg, accelerator)
            # accelerate.prepare takes the per-process batch from a prepared DataLoader; there is none.
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
                cfg.micro_batch_size
        else:
            model = build_model(cfg)
        tokenizer = model.tokenizer
        batches, heldout = build_data(cfg, tokenizer)
        hooks: list[EvalHook] = ([HeldoutLoss(heldout, cfg.seed)] if heldout else []) + list(eval_hooks or [])
        if hooks and not cfg.eval_every:
            raise ValueError("eval hooks were given but eval_every is 0; set eval_every")

        state = None
        fingerprint = _fingerprint(model, cfg)
        if resume_from is not None:
            state = checkpoint.load_training_state(resume_from)
            checkpoint.check_fingerprint(resume_from, state["fingerprint"], fingerprint)
            if not sharded:
                checkpoint.load_model_weights(model, resume_from)
        if accelerator.is_fsdp2:
            _shard_lm_embedding(model, accelerator)  # before the optimiser: it holds the new params
        optimizer = build_optimizer(model, cfg)
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped: QuietStarForCausalLM = accelerator.unwrap_model(model)
        device = accelerator.device
        bf16 = _use_bf16(cfg.precision, device)
        if device.type == "cpu":
            # Subnormal floats (SmolLM2's small activations underflow: a forward is 6x faster with
            # them flushed to zero) and malloc returning each step's activation memory.
            tune_for_training()

        start_step, nonfinite = 0, 0
        if state is not None:
            if sharded:
                accelerator.load_state(str(resume_from / checkpoint.SHARDED_DIR))
            else:
                try:
                    optimizer.load_state_dict(state["optimizer"])
                except (ValueError, KeyError) as e:
                    raise checkpoint.CheckpointError(
                        f"the optimiser state in {resume_from} does not fit this model ({e}); "
                        "resume with that run's settings, or start a fresh run") from None
            batches.load_state_dict(state["data"])
            start_step, nonfinite = int(state["step"]), int(state["nonfinite_in_a_row"])
        batch_iter = iter(batches)
        first_batch = next(batch_iter)  # too little data fails here, before any training
        if state is not None:
            checkpoint.restore_rng(state["rng"])  # last: building the model consumed randomness

        metrics = MetricsLogger(out_dir, cfg.report_to, cfg.to_dict(),
                                resume_step=start_step if state is not None else None) if main else None
        samples = SampleWriter(out_dir, resume_step=start_step if state is not None else None) \
            if main and cfg.sample_every else None

        def save(step: int) -> Path:
            full_state = accelerator.get_state_dict(model) if sharded else None  # collective
            if main:
                checkpoint.begin(out_dir, step)
            accelerator.wait_for_everyone()
            tmp = checkpoint.temp_folder(out_dir, step)
            if sharded:
                accelerator.save_state(str(tmp / checkpoint.SHARDED_DIR))
            if main:
                checkpoint.save_model(unwrapped, tmp / checkpoint.MODEL_DIR, full_state)
                if cfg.lora_rank:
                    checkpoint.save_adapter(unwrapped, tmp / checkpoint.ADAPTER_DIR)
                checkpoint.save_training_state(tmp, {
                    "step": step, "optimizer": None if sharded else optimizer.state_dict(),
                    "rng": checkpoint.capture_rng(), "data": batches.state_dict(),
                    "nonfinite_in_a_row": nonfinite, "fingerprint": fingerprint,
                })
                (tmp / checkpoint.CONFIG_NAME).write_text(cfg.to_yaml(), encoding="utf-8")
                checkpoint.commit(out_dir, step, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
            return out_dir / checkpoint.checkpoint_name(step)

        A = cfg.quietstar.ahead_tokens
        names = (["loss", "base_nll"] + [f"mixed_nll_{s + 1}" for s in range(A)]
                 + ["policy_loss", "mean_reward", "positive_reward_fraction", "thought_gain",
                    "mean_mixing_weight"])
        history: dict[str, list[float]] = {"base_nll": [], "mixed_nll_1": [], "thought_gain": []}
        first_eval: dict[str, float] = {}
        record: dict[str, Any] = {}
        last_checkpoint: Path | None = resume_from
        interrupted = False
        logger.info(f"Training {cfg.max_steps - start_step} steps "
                    + (f"(from step {start_step}) " if start_step else "")
                    + f"of {cfg.batch_size} x {cfg.seq_len} tokens on {world} x {device.type}"
                    + (" (bf16)" if bf16 else "") + f"; run folder {out_dir}")

        from tqdm.auto import tqdm

        def evaluate(at_step: int) -> dict[str, float]:
            unwrapped.eval()
            results: dict[str, float] = {}
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                for hook in hooks:
                    results |= hook(unwrapped, at_step)
            unwrapped.train()
            first_eval.update({k: v for k, v in results.items() if k not in first_eval})
            logger.info(f"step {at_step} held-out: " + ", ".join(
                f"{k.removeprefix('eval/')} {v:.4f}" for k, v in results.items()))
            return results

        if hooks and start_step == 0:  # the starting point of the held-out curves
            results = evaluate(0)
            if main:
                metrics.log({"step": 0, **results})

        bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not main, unit="step",
                   dynamic_ncols=True, desc="quietstar train")
        step = start_step
        pending = first_batch
        with _StopRequests() as stop:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                batch = pending if pending is not None else next(batch_iter)
                pending = None
                sums = torch.zeros(len(names), device=device)
                for j in range(accumulation):
                    lo = (j * world + rank) * cfg.micro_batch_size
                    rows = {k: v[lo:lo + cfg.micro_batch_size].to(device) for k, v in batch.items()}
                    generator = thought_generator(cfg.seed, step, lo, device)
                    with accelerator.accumulate(model):
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                            out = model(rows["input_ids"], rows["attention_mask"], rows["labels"],
                                        generator=generator, check_finite=False)
                        accelerator.backward(out.loss)
                    sums += torch.stack([out.loss.detach(), out.base_nll, *out.mixed_nll,
                                         out.policy_loss, out.mean_reward,
                                         out.positive_reward_fraction, out.thought_gain,
                                         out.mean_mixing_weight]).float() / accumulation
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                # One reduction gives every process the same numbers and the same stop decision.
                flags = torch.tensor([float(stop.requested)], device=device)
                reduced = accelerator.reduce(torch.cat([sums / world, flags]), "sum").tolist()
                values, stop_requested = dict(zip(names, reduced[:-1])), reduced[-1] > 0
                grad_norm = float(grad_norm) if grad_norm is not None else None
                finite = math.isfinite(values["loss"]) and (grad_norm is None or math.isfinite(grad_norm))
                if finite:
                    optimizer.step()
                    nonfinite = 0
                else:
                    nonfinite += 1
                    logger.warning(f"step {step + 1}: non-finite loss or gradient (loss "
                                   f"{values['loss']}, grad norm {grad_norm}); step skipped "
                                   f"({nonfinite} in a row, stopping at {cfg.max_nonfinite_steps})")
                optimizer.zero_grad(set_to_none=True)
                step += 1
                elapsed = time.perf_counter() - t0

                record = {"step": step, **values,
                          "mixed_nll": sum(values[f"mixed_nll_{s + 1}"] for s in range(A)) / A,
                          "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": cfg.batch_size * cfg.seq_len / elapsed,
                          "step_time_s": elapsed}
                if not finite:
                    record["skipped"] = True
                if hooks and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    record |= evaluate(step)
                if main:
                    metrics.log(record)
                    if finite:
                        for key in history:
                            history[key].append(values[key])
                    bar.set_postfix_str(
                        f"nll {_running(history['base_nll']):.3f} with thought "
                        f"{_running(history['mixed_nll_1']):.3f} gain "
                        f"{_running(history['thought_gain']):+.3f}", refresh=False)
                    bar.update(1)
                    if samples is not None and (step % cfg.sample_every == 0 or step == 1):
                        mask = rows["attention_mask"][0]
                        length = int(mask.sum())
                        positions = sorted({max(0, min(length - 2, int(length * f))) for f in (0.3, 0.6, 0.9)})
                        shown = thought_samples(tokenizer, rows["input_ids"][0].cpu(),
                                                out.thought_ids[0, 0].cpu(), positions, A)
                        samples.write(step, shown)
                        logger.info(f"step {step} thoughts:\n" + "\n".join(f"  {format_sample(s)}" for s in shown))

                if nonfinite >= cfg.max_nonfinite_steps:
                    last_checkpoint = save(step)
                    bar.close()
                    raise TrainingDiverged(
                        f"stopped at step {step}: {nonfinite} steps in a row had a NaN/inf loss or "
                        f"gradient. Saved {last_checkpoint} (the weights before them). Lower "
                        "--learning-rate or --policy-loss-weight (or use --precision fp32), then "
                        f"continue with --resume {last_checkpoint}")
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop_requested:
                    last_checkpoint = save(step)
                if stop_requested:
                    interrupted = True
                    break
        bar.close()
        if metrics is not None:
            metrics.close()

        total = time.perf_counter() - started
        if main:
            plot_training_curves(out_dir / METRICS_NAME, out_dir / CURVES_NAME)
            _summary(out_dir, last_checkpoint, step, total, history, first_eval, record, interrupted,
                     start_step)
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, last_checkpoint, step, record, interrupted, total)


def _summary(out_dir, last_checkpoint, step, total, history, first_eval, record, interrupted,
             start_step) -> None:
    head = (f"Interrupted at step {step}; continue with: quietstar train --resume {out_dir}"
            if interrupted else f"Done: {step - start_step} steps in {_format_time(total)}.")
    lines = [head]
    if len(history["base_nll"]) >= 2:
        first, last = history["base_nll"][:5], history["base_nll"]
        lines.append(f"Training NLL (mean of 5 steps): {_running(first):.3f} -> {_running(last):.3f}"
                     f" without thought, {_running(history['mixed_nll_1'][:5]):.3f} -> "
                     f"{_running(history['mixed_nll_1']):.3f} with thought")
    if "eval/nll_with_thought" in first_eval and "eval/nll_with_thought" in record:
        lines.append(f"Held-out NLL: {first_eval['eval/nll_without_thought']:.4f} -> "
                     f"{record['eval/nll_without_thought']:.4f} without thought, "
                     f"{first_eval['eval/nll_with_thought']:.4f} -> "
                     f"{record['eval/nll_with_thought']:.4f} with thought")
    lines.append(f"Run folder: {out_dir}")
    if last_checkpoint is not None:
        lines.append(f"  {last_checkpoint.name}/model   the trained model "
                     "(QuietStarForCausalLM.from_pretrained)")
    lines += [f"  {CURVES_NAME}   the training curves", f"  {SAMPLES_MD}   sampled thoughts",
              f"  {METRICS_NAME}   every step's numbers"]
    logger.info("\n".join(lines))
