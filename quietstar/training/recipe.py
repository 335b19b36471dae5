"""Training: the ``TrainingRecipe`` behind ``quietstar train`` and the ``train(TrainConfig)`` API.

One recipe from a laptop CPU to a GPU cluster (it runs as is under ``accelerate launch`` /
``torchrun`` with DDP, FSDP2 or DeepSpeed ZeRO):

    config = load_config("examples/train.yaml", {"max_steps": 100})
    result = train(config)            # -> TrainResult(output_dir, checkpoint, ...)

``run()`` is ``setup()`` (every ``setup_*`` stage in order, ``load_checkpoint`` when resuming,
``start_data``), then per step ``train_step`` and ``log_step`` (``evaluate`` every ``eval_every``
steps, ``save_checkpoint`` every ``checkpoint_every``), then ``finish()``. The pieces live in
their own modules: the configuration (``config``), the model, data, held-out loss and thought
generators (``components``), the optimiser and schedule (``optim``), the two gradients of
``policy_max_grad_norm`` (``gradients``), checkpoints (``checkpoint``), logs and plots
(``metrics``), the run folder and console (``run_folder``), FSDP / DeepSpeed (``distributed``).

Batches. ``batch_size`` is the *global* number of sequences per optimiser step; each process runs
``micro_batch_size`` of them per forward pass, accumulating gradients over
``batch_size / (micro_batch_size * processes)`` passes. Global sequence j of step s is always
the same sequence, whatever the number of processes. Each micro-batch samples its thoughts with
its own generator (``components.thought_generator``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quietstar.training import checkpoint
from quietstar.training.cpu import tune_for_training
from quietstar.training.distributed import build_model_whole, shard_lm_embedding
from quietstar.training.gradients import add_back, clip_policy_apart, hold_apart
from quietstar.training.metrics import CURVES_NAME, METRICS_NAME, MetricsLogger, SampleWriter, format_sample, \
    plot_training_curves, thought_samples
from quietstar.data.corpora import TokenBatches
from quietstar.models.limits import check_training_memory, check_training_positions
from quietstar.models.loading import read_model_config, read_quietstar_tokenizer
from quietstar.models.model_card import TrainingFacts
from quietstar.models.modeling import QuietStarForCausalLM
from quietstar.training.optim import build_optimizer, lr_at, set_learning_rate
from quietstar.training.run_folder import StopRequests, check_writable, claim_output_dir, diverged_message, \
    push_failed_message, refuse_nested, run_logging, running_mean, summary
from quietstar.training.run_lock import RunLock
from quietstar.training.config import SettingsOrigin, TrainConfig, load_config, settings_report
from quietstar.training.components import EvalHook, HeldoutLoss, build_data, build_model, model_fingerprint, \
    thought_generator
from quietstar.utils.errors import QuietStarInputError
from quietstar.utils.hub import check_can_push

if TYPE_CHECKING:  # for the annotations; the code imports both where it uses them
    from accelerate import Accelerator
    from tqdm.auto import tqdm

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingRecipe", "EvalHook",
           "HeldoutLoss", "build_data", "build_model", "build_optimizer", "load_config", "lr_at",
           "thought_generator", "train"]

logger = logging.getLogger(__name__)

# Shown on the progress bar and in the summary (a running mean of the last steps).
PROGRESS_METRICS = ("base_nll", "model_nll", "thought_gain")


@dataclass
class TrainResult:
    """What ``train`` returns."""

    output_dir: Path
    checkpoint: Path | None   # the last checkpoint written
    step: int                 # optimiser steps done
    metrics: dict[str, Any]   # the last step's record
    interrupted: bool         # stopped by Ctrl-C / SIGTERM (after saving)
    elapsed_s: float
    pushed_to: str | None = None  # the Hub repo's URL, where push_to_hub uploaded the model


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last good weights was saved."""


# ============================================================================ the recipe
class TrainingRecipe:
    """A Quiet-STaR training run in named stages; ``run()`` calls them in order.

    Raises ``TrainingDiverged`` (after saving) when ``max_nonfinite_steps`` steps in a row are
    non-finite. Ctrl-C / SIGTERM stop after the current step with a checkpoint
    (``TrainResult.interrupted``). ``tune_cpu``: see ``train``.
    """

    def __init__(self, config: TrainConfig, eval_hooks: Sequence[EvalHook] | None = None, *,
                 tune_cpu: bool = False, origin: SettingsOrigin | None = None):
        self.config = config                     # with output_dir resolved by setup_run_folder
        self.origin = origin                     # where each setting came from (for the log)
        self.extra_hooks = list(eval_hooks or [])
        self.tune_cpu = tune_cpu
        # The run's state, None until the stage that sets it (setup_accelerator first, then on).
        self.accelerator: Accelerator | None = None
        self.world: int | None = None            # processes
        self.rank: int | None = None
        self.main: bool | None = None            # the main process (logs, plots, the summary)
        self.accumulation: int | None = None     # micro-batches per optimiser step and process
        self.deepspeed: bool | None = None
        self.sizes_checked = False               # positions and memory, by check_sizes
        self.sharded: bool | None = None         # FSDP or DeepSpeed: no whole state per process
        self.ema: bool | None = None             # an EMA copy of the LM (QuietStarConfig.uses_ema_copy)
        self.resume_from: Path | None = None     # the checkpoint this run continues
        self.out_dir: Path | None = None
        self.lock: RunLock | None = None         # the run folder's (main process), held until the end
        self.new_folder: Path | None = None      # created by this run: removed if it fails before step 1
        self.closing = contextlib.ExitStack()    # the console and train.log logging, closed by finish
        self.model: Any = None                   # as accelerate prepared it (wrapped when distributed)
        self.unwrapped: QuietStarForCausalLM | None = None
        self.tokenizer: Any = None
        self.fingerprint: dict[str, Any] | None = None  # what a resumed checkpoint must match
        self.batches: TokenBatches | None = None
        self.hooks: list[EvalHook] | None = None  # the held-out loss, then the extra hooks
        self.optimizer: torch.optim.Optimizer | None = None
        self.device: torch.device | None = None
        self.bf16: bool | None = None            # bf16 autocast
        self.state: dict[str, Any] | None = None  # the resumed checkpoint's training state
        self.batch_iter: Iterator[dict[str, torch.Tensor]] | None = None
        self.pending: dict[str, torch.Tensor] | None = None  # the first batch, read by start_data
        self.metrics: MetricsLogger | None = None  # main process only
        self.samples: SampleWriter | None = None   # main process, with sample_every
        self.step = self.start_step = 0          # optimiser steps done; those done before a resume
        self.nonfinite = 0                       # non-finite steps in a row
        self.stop = StopRequests()               # Ctrl-C / SIGTERM; its handlers are set in the loop
        self.stop_requested = False              # by any process, agreed at the last step
        self.bar: tqdm | None = None             # the progress bar, in the loop
        self.history: dict[str, list[float]] = {k: [] for k in PROGRESS_METRICS}
        self.record: dict[str, Any] = {}         # the last step's
        self.last_checkpoint: Path | None = None
        self.last_good: dict[str, Any] | None = None  # the last finite step's record
        self.start_scale: float | None = None    # the largest |weight| before the first step
        self.pushed_to: str | None = None
        self.last_eval: dict[str, float] = {}    # the latest held-out figures, for the model card
        self.last_samples: list[str] = []        # the latest sampled thoughts, likewise

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Every stage before the first step, in order; ``train_step`` can run right after."""
        self.setup_accelerator()
        self.check_sizes()
        self.setup_run_folder()
        self.setup_logging()
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)  # a refusal here leaves the run's settings file as it was
            if self.main:
                self.config.save(self.out_dir)
        self.start_data()
        self.setup_metrics()
        self.start_scale = self.weight_scale()

    def setup_accelerator(self) -> None:
        from accelerate import Accelerator, DistributedType, PartialState

        cfg = self.config
        cpu = not torch.cuda.is_available()
        self.world = PartialState(cpu=cpu).num_processes
        per_step = cfg.micro_batch_size * self.world
        if cfg.batch_size % per_step:
            raise QuietStarInputError(f"batch_size {cfg.batch_size} is not divisible by micro_batch_size "
                                      f"{cfg.micro_batch_size} x {self.world} processes; use a batch_size that "
                                      f"is a multiple of {per_step}")
        self.accumulation = cfg.batch_size // per_step
        # accumulate() in train_step skips the gradient sync of all but the last micro-batch, and
        # backward() divides the loss by the number of micro-batches (DeepSpeed: its engine does both).
        self.accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=self.accumulation)
        self.rank, self.main = self.accelerator.process_index, self.accelerator.is_main_process
        self.device = self.accelerator.device
        p = cfg.precision  # "auto": bf16 where the GPU has it
        self.bf16 = p == "bf16" or (p == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.sharded = self.deepspeed or self.accelerator.distributed_type == DistributedType.FSDP
        if self.sharded and cfg.lora_rank:
            raise QuietStarInputError("LoRA with FSDP / DeepSpeed is not supported; use DDP (or one process) "
                                      "for LoRA, or train all weights (--lora-rank 0)")
        self.ema = cfg.quietstar.uses_ema_copy
        if self.sharded and self.ema:
            raise QuietStarInputError("objective='rlp' or reward_baseline='ema_base' with FSDP / DeepSpeed is not "
                                      "supported (its EMA copy of the LM is not sharded); use DDP or one process")
        if self.world > 1 and cfg.policy_max_grad_norm is not None:
            raise QuietStarInputError("policy_max_grad_norm (two backward passes per step) runs in one process "
                                      "for now; unset it or train with one process")

    def check_sizes(self, model: QuietStarForCausalLM | None = None) -> None:
        """The base LM's positions and a step's memory against seq_len, k, A, the thought_prefix's
        tokens, n and the micro-batch (``models.limits``), from the LM's config and tokenizer: read
        from their files before the run folder, the model or the data is touched, or, where that
        needs the model (``read_model_config`` or ``read_quietstar_tokenizer`` gives None), from
        ``model`` once ``setup_model`` has loaded it."""
        cfg = self.config
        if model is not None:
            lm_config, prefix_tokens = model.lm.config, len(model.thought_prefix_ids)
        else:
            where = dict(revision=cfg.revision, cache_dir=cfg.cache_dir)
            lm_config, prefix_tokens = read_model_config(cfg.model, **where), 0
            if lm_config is not None and cfg.quietstar.thought_prefix:  # its tokens, as the model counts them
                tokenizer = read_quietstar_tokenizer(cfg.model, **where)
                if tokenizer is None:
                    return
                prefix_tokens = len(cfg.quietstar.thought_prefix_ids(tokenizer))
        if lm_config is None:
            return
        check_training_positions(lm_config, cfg.quietstar, cfg.seq_len, prefix_tokens=prefix_tokens)
        check_training_memory(lm_config, cfg.quietstar, seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size,
                              device=self.device, bf16=self.bf16, activation_checkpointing=cfg.activation_checkpointing,
                              processes_sharing=self.world if self.device.type == "cpu" else 1)
        self.sizes_checked = True

    def setup_run_folder(self) -> None:
        """The run folder (every process must agree on its name), checked writable, with the
        resolved configuration written into it."""
        cfg = self.config
        self.resume_from = checkpoint.resolve_resume(cfg.resume, cfg.output_dir) if cfg.resume else None
        if self.resume_from is not None and cfg.max_steps < checkpoint.step_of(self.resume_from):
            raise QuietStarInputError(f"max_steps {cfg.max_steps} is below the step of the resumed checkpoint "
                                      f"{self.resume_from} ({checkpoint.step_of(self.resume_from)}): a resumed "
                                      "run continues up to max_steps; give a larger --max-steps")
        if cfg.output_dir:
            out_dir = Path(cfg.output_dir)
        elif self.resume_from is not None:
            out_dir = self.resume_from.parent
        else:
            from accelerate.utils import broadcast_object_list

            name = [time.strftime("quietstar-%Y%m%d-%H%M%S")]
            if self.world > 1:
                broadcast_object_list(name)
            out_dir = Path("runs") / name[0]
        refuse_nested(out_dir)  # reads only; every process alike
        self.new_folder = self._claim_folder(out_dir, self.resume_from is not None)
        self.out_dir = out_dir
        self.config = TrainConfig.from_dict({**cfg.to_dict(), "output_dir": str(out_dir)})
        self.last_checkpoint = self.resume_from
        if self.main:
            checkpoint.remove_partial(out_dir)
            if self.resume_from is None:  # a resumed run's settings are written once its checkpoint loads
                self.config.save(out_dir)

    def _claim_folder(self, out_dir: Path, resuming: bool) -> Path | None:
        """The main process checks the push and takes the folder's lock before anything is written
        there; the others wait for its answer (refusing with it), then check they can write.
        Returns the topmost folder the main process created (see ``claim_output_dir``)."""
        error, new_folder = None, None
        if self.main:
            try:
                if self.config.push_to_hub:
                    check_can_push(self.config.push_to_hub)
                self.lock, new_folder = claim_output_dir(out_dir, resuming)
            except (QuietStarInputError, OSError) as e:
                error = e
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            message = [None if error is None else str(error)]
            broadcast_object_list(message)
            if message[0] is not None and error is None:
                raise QuietStarInputError(message[0])
        if error is not None:
            raise error
        if not self.main:
            check_writable(out_dir, self.rank)
        return new_folder

    def setup_logging(self) -> None:
        """INFO logs of the training modules to the console and ``train.log`` (main process),
        until ``finish``; then what the run starts from."""
        self.closing.enter_context(run_logging(logging.getLogger("quietstar.training"), self.out_dir, self.main))
        if self.lock is not None and self.lock.taken_over is not None:
            dead = self.lock.taken_over
            logger.warning(f"Took over {self.lock.path}: its run (pid {dead['pid']}, started "
                           f"{dead.get('started') or 'at an unknown time'}) is no longer running")
        if self.main:  # before the model loads: a long load shows what it is loading for
            if self.config.resume and self.resume_from is None:
                logger.info(f"--resume {self.config.resume}: {self.out_dir} holds no checkpoint yet, so "
                            "this is a new run (the same command continues it once it has saved one)")
            logger.info(settings_report(self.config, self.origin))

    def setup_model(self) -> None:
        """The model, seeded first: the weights the method adds (mixing head, meta tokens) are drawn."""
        from accelerate.utils import set_seed

        cfg = self.config
        set_seed(cfg.seed)
        logger.info(f"Loading {cfg.model} ...")
        if self.deepspeed:
            model = build_model_whole(lambda: build_model(cfg), self.accelerator)
            # accelerate.prepare takes the per-process batch from a prepared DataLoader; there is none.
            self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
                cfg.micro_batch_size
        else:
            model = build_model(cfg)
        if not self.sizes_checked:  # its files could not be read before: before any data is read
            self.check_sizes(model)
        if self.ema:
            model.ema_baseline_enable()  # before accelerate moves and wraps the model
        self.model = self.unwrapped = model
        self.tokenizer = model.tokenizer
        self.fingerprint = model_fingerprint(model, cfg)

    def setup_data(self) -> None:
        cfg = self.config
        self.batches, heldout = build_data(cfg, self.tokenizer)
        hook = HeldoutLoss(heldout, cfg.seed, own_minus_shifted=cfg.logs_own_minus_shifted)
        self.hooks = ([hook] if heldout else []) + self.extra_hooks
        if self.hooks and not cfg.eval_every:
            raise QuietStarInputError("eval hooks were given but eval_every is 0; set eval_every")

    def setup_optimizer(self) -> None:
        """The optimiser, then accelerate's preparation of model and optimiser for the device(s)."""
        if self.accelerator.is_fsdp2:
            shard_lm_embedding(self.model, self.accelerator)  # before the optimiser: it holds the new params
        optimizer = build_optimizer(self.model, self.config)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        if self.tune_cpu and self.device.type == "cpu":
            # Subnormal floats (SmolLM2's small activations underflow: a forward is 6x faster with
            # them flushed to zero) and malloc returning each step's activation memory.
            tune_for_training()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, keep_all: bool = False) -> Path:
        """Checkpoint ``step`` (every process takes part; see ``checkpoint.save_checkpoint``);
        ``keep_all``: delete no older checkpoint."""
        acc = self.accelerator
        full_state = acc.get_state_dict(self.model) if self.sharded else None  # a collective
        state = {"step": step, "optimizer": None if self.sharded else self.optimizer.state_dict(),
                 "rng": checkpoint.capture_rng(), "data": self.batches.state_dict(),
                 "nonfinite_in_a_row": self.nonfinite, "fingerprint": self.fingerprint}
        if self.ema:
            state["ema"] = {k: v.detach().cpu() for k, v in self.unwrapped.ema_lm.state_dict().items()}
        facts = TrainingFacts(data=self.config.data, steps=step,
                              tokens_per_step=self.config.batch_size * self.config.seq_len,
                              heldout=dict(self.last_eval), samples=list(self.last_samples))
        self.last_checkpoint = checkpoint.save_checkpoint(
            self.out_dir, step, self.unwrapped, training_state=state, config=self.config,
            keep=None if keep_all else self.config.keep_checkpoints, full_state=full_state,
            lora=bool(self.config.lora_rank),
            save_sharded=(lambda folder: acc.save_state(str(folder))) if self.sharded else None,
            is_main=self.main, barrier=acc.wait_for_everyone, training=facts)
        return self.last_checkpoint

    def load_checkpoint(self, path: Path) -> None:
        """Weights, optimiser, data position and counters from checkpoint ``path``; the RNG
        states are restored by ``start_data`` (last: building the model consumed randomness)."""
        load_sharded = (lambda folder: self.accelerator.load_state(str(folder))) if self.sharded else None
        self.state = checkpoint.load_checkpoint(path, self.unwrapped, self.fingerprint,
                                                optimizer=self.optimizer, load_sharded=load_sharded)
        if self.ema:
            if "ema" not in self.state:
                raise checkpoint.CheckpointError(f"{path} holds no EMA copy of the LM, which "
                                                 "objective='rlp' / reward_baseline='ema_base' needs; resume "
                                                 "with that run's settings, or start a fresh run")
            self.unwrapped.ema_lm.load_state_dict(self.state["ema"])
        self.batches.load_state_dict(self.state["data"])
        self.step = self.start_step = int(self.state["step"])
        self.nonfinite = int(self.state["nonfinite_in_a_row"])

    def start_data(self) -> None:
        """Reads the first batch (too little data fails here, before any training), then restores
        the resumed run's RNG states: nothing random may happen between them and the first step."""
        self.batch_iter = iter(self.batches)
        self.pending = next(self.batch_iter)
        if self.state is not None:
            checkpoint.restore_rng(self.state["rng"])

    def setup_metrics(self) -> None:
        """The main process's metrics and thoughts logs; a fresh run starts them afresh (-1: keep no
        record), also in a folder left by a run killed before its first checkpoint."""
        cfg = self.config
        resumed = self.start_step if self.state is not None else -1
        self.metrics = MetricsLogger(self.out_dir, cfg.report_to, cfg.to_dict(), resume_step=resumed) \
            if self.main else None
        self.samples = SampleWriter(self.out_dir, resume_step=resumed) if self.main and cfg.sample_every else None
        logger.info(f"Training {cfg.max_steps - self.start_step} steps "
                    + (f"(from step {self.start_step}) " if self.start_step else "")
                    + f"of {cfg.batch_size} x {cfg.seq_len} tokens on {self.world} x {self.device.type}"
                    + (" (bf16)" if self.bf16 else "") + f"; run folder {self.out_dir}")

    # ------------------------------------------------------------------ steps
    def train_step(self, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
        """One optimiser step over ``accumulation`` micro-batches of this process. Returns the
        step's record (metrics averaged over micro-batches and processes), the last micro-batch
        and its model output (for the sampled thoughts)."""
        cfg, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        set_learning_rate(self.optimizer, lr)
        batch = self.pending if self.pending is not None else self._next_batch()
        self.pending = None
        sums: dict[str, torch.Tensor] = {}
        apart: dict[str, dict] = {"nll": {}, "policy": {}}  # policy_max_grad_norm: gradients apart
        for j in range(self.accumulation):
            lo = (j * self.world + self.rank) * cfg.micro_batch_size
            rows = {k: v[lo:lo + cfg.micro_batch_size].to(self.device) for k, v in batch.items()}
            with acc.accumulate(self.model):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    out = self.model(rows["input_ids"], rows["attention_mask"], rows["labels"],
                                     generator=thought_generator(cfg.seed, step, lo, self.device),
                                     check_finite=False, thought_tokens_per_backward=cfg.thought_tokens_per_backward)
                if cfg.policy_max_grad_norm is None:
                    acc.backward(out.loss)
                else:
                    acc.backward(out.terms["nll"], retain_graph=True)
                    hold_apart(self.model.parameters(), apart["nll"])
                    acc.backward(out.terms["policy"])
                    hold_apart(self.model.parameters(), apart["policy"])
            for name, value in {"loss": out.loss.detach(), **out.metrics}.items():
                sums[name] = sums.get(name, 0) + value.float() / self.accumulation
        grad_norm, extra = self._clip_gradients(apart if cfg.policy_max_grad_norm is not None else None)
        values, self.stop_requested = self._reduce(sums)
        finite = math.isfinite(values["loss"]) and (grad_norm is None or math.isfinite(grad_norm)) \
            and all(math.isfinite(v) for v in extra.values())
        if finite:
            self.optimizer.step()
            if self.ema:
                self.unwrapped.update_ema_baseline()
            self.nonfinite = 0
        else:
            self.nonfinite += 1
            logger.warning(f"step {step + 1}: non-finite loss or gradient (loss {values['loss']}, grad "
                           f"norm {grad_norm}); step skipped ({self.nonfinite} in a row, stopping at "
                           f"{cfg.max_nonfinite_steps})")
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, **values, "lr": lr, "grad_norm": grad_norm, **extra,
                  "tokens_per_s": cfg.batch_size * cfg.seq_len / elapsed, "step_time_s": elapsed}
        if not finite:
            record["skipped"] = True
        return record, rows, out

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The next training batch. Bad data that the stream reaches only now (a malformed record
        deep in a file, a file gone) ends the run as bad input, but the steps done since the last
        checkpoint are saved first: the data is read as training goes, so no work is lost to it."""
        try:
            return next(self.batch_iter)
        except (QuietStarInputError, OSError) as error:
            saved = self.start_step if self.last_checkpoint is None else checkpoint.step_of(self.last_checkpoint)
            if self.step <= saved:
                raise
            path = self.save_checkpoint(self.step)
            raise QuietStarInputError(f"{error}; the {self.step} steps done are saved in {path}: fix the data, then "
                                      f"continue with --resume {path}") from error

    def _clip_gradients(self, apart: dict[str, dict] | None) -> tuple[float | None, dict[str, float]]:
        """Clips the step's gradient; returns its norm and extra metrics. ``apart`` (policy_max_grad_norm):
        the NLL and policy gradients held apart, each clipped at its own norm, then summed into ``.grad``."""
        cfg, params = self.config, self.model.parameters
        extra: dict[str, float] = {}
        if apart is not None:  # .grad = the NLL gradient, clipped below as usual
            extra["policy_grad_norm"] = clip_policy_apart(params, apart, cfg.policy_max_grad_norm)
        grad_norm = self.accelerator.clip_grad_norm_(params(), cfg.max_grad_norm)
        if apart is not None:
            add_back(apart["policy"])
        return (float(grad_norm) if grad_norm is not None else None), extra

    def _reduce(self, sums: dict[str, torch.Tensor]) -> tuple[dict[str, float], bool]:
        """One reduction gives every process the same numbers and the same stop decision."""
        names = sorted(sums)
        flags = torch.tensor([float(self.stop.requested)], device=self.device)
        packed = torch.cat([torch.stack([sums[n] for n in names]) / self.world, flags])
        reduced = self.accelerator.reduce(packed, "sum").tolist()
        return dict(zip(names, reduced[:-1])), reduced[-1] > 0

    def weight_scale(self) -> float | None:
        """The largest |weight| of the model (None where sharded: no process holds it whole)."""
        if self.sharded:
            return None
        with torch.no_grad():
            return max((p.detach().abs().max().float().item() for p in self.unwrapped.parameters()
                        if p.numel()), default=0.0)

    def evaluate(self, step: int) -> dict[str, float]:
        """Every eval hook, with the model in eval mode and no gradients."""
        self.unwrapped.eval()
        results: dict[str, float] = {}
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for hook in self.hooks:
                results |= hook(self.unwrapped, step)
        self.unwrapped.train()
        self.last_eval = results
        logger.info(f"step {step} held-out: " + ", ".join(
            f"{k.removeprefix('eval/')} {v:.4f}" for k, v in results.items()))
        return results

    def log_step(self, record: dict[str, Any], rows: dict[str, torch.Tensor], out) -> None:
        """Main process: the metrics log, the progress bar and, every sample_every steps, thoughts."""
        if not self.main:
            return
        step = record["step"]
        self.metrics.log(record)
        if not record.get("skipped"):
            for key in self.history:
                self.history[key].append(record[key])
        self.bar.set_postfix_str(
            f"nll {running_mean(self.history['base_nll']):.3f} with thought "
            f"{running_mean(self.history['model_nll']):.3f} gain "
            f"{running_mean(self.history['thought_gain']):+.3f}", refresh=False)
        self.bar.update(1)
        if self.samples is not None and (step % self.config.sample_every == 0 or step == 1):
            length = int(rows["attention_mask"][0].sum())
            positions = sorted({max(0, min(length - 2, int(length * f))) for f in (0.3, 0.6, 0.9)})
            if out.thought_positions is not None:  # thought_fraction < 1: among those that thought
                thought = out.thought_positions[0].nonzero().flatten().tolist() or [0]
                positions = sorted({thought[int(len(thought) * f)] for f in (0.3, 0.6, 0.9)})
            shown = thought_samples(self.tokenizer, rows["input_ids"][0].cpu(), out.thought_ids[0, 0].cpu(),
                                    positions, self.config.quietstar.ahead_tokens)
            self.samples.write(step, shown)
            self.last_samples = [format_sample(s) for s in shown]
            logger.info(f"step {step} thoughts:\n" + "\n".join(f"  {s}" for s in self.last_samples))

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """``setup``, the steps, ``finish``."""
        started = time.perf_counter()
        try:
            self.setup()
            self.new_folder = None  # from here on the folder holds a run
            interrupted = self._loop()
            total = time.perf_counter() - started
            self.finish(total, interrupted)
        except BaseException:
            self.closing.close()
            if self.new_folder is not None and self.lock is not None:  # bad model or data: leave nothing
                shutil.rmtree(self.new_folder, ignore_errors=True)
            raise
        finally:
            if self.lock is not None:
                self.lock.release()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.out_dir, self.last_checkpoint, self.step, self.record, interrupted, total,
                           self.pushed_to)

    def _loop(self) -> bool:
        """Steps until max_steps or a stop request; returns whether it was interrupted."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.hooks and self.start_step == 0:  # the starting point of the held-out curves
            results = self.evaluate(0)
            if self.main:
                self.metrics.log({"step": 0, **results})
        with tqdm(total=cfg.max_steps, initial=self.start_step, disable=not self.main, unit="step",
                  dynamic_ncols=True, desc="quietstar train") as self.bar, self.stop:
            while self.step < cfg.max_steps:
                record, rows, out = self.train_step(self.step)
                self.step += 1
                if not record.get("skipped"):
                    self.last_good = record
                if self.hooks and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    record |= self.evaluate(self.step)
                self.record = record
                self.log_step(record, rows, out)
                if self.nonfinite >= cfg.max_nonfinite_steps:
                    saved = self.save_checkpoint(self.step, keep_all=True)  # an earlier one may be the good one
                    now = self.weight_scale()
                    raise TrainingDiverged(diverged_message(
                        step=self.step, streak=self.nonfinite, saved=saved, last_good=self.last_good,
                        start_step=self.start_step, learning_rate=cfg.learning_rate,
                        weight_scale=None if now is None else (now, self.start_scale)))
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or self.stop_requested:
                    self.save_checkpoint(self.step)
                if self.stop_requested:
                    return True
        return False

    def finish(self, total: float, interrupted: bool) -> None:
        """Closes the logs; the main process draws the curves and prints the summary."""
        if self.metrics is not None:
            self.metrics.close()
        if self.main:
            plot_training_curves(self.out_dir / METRICS_NAME, self.out_dir / CURVES_NAME)
            logger.info(summary(self.out_dir, last_checkpoint=self.last_checkpoint, step=self.step,
                                start_step=self.start_step, elapsed=total, interrupted=interrupted))
            if self.config.push_to_hub and self.last_checkpoint is not None and not interrupted:
                self.push(self.config.push_to_hub, self.last_checkpoint / checkpoint.MODEL_DIR)
        self.closing.close()

    def push(self, repo_id: str, folder: Path) -> None:
        """Uploads the saved model ``folder``; a failure (checked as far as possible before the
        run) keeps the model and logs how to upload it later, on one line."""
        try:
            self.pushed_to = self.unwrapped.push_to_hub(repo_id, folder=folder)
        except Exception as e:  # the Hub client's errors (network, HTTP) are of many kinds
            logger.error(push_failed_message(repo_id, folder, e))
            return
        logger.info(f"Pushed {folder.parent.name}/model to {self.pushed_to}")


def train(config: TrainConfig, eval_hooks: Sequence[EvalHook] | None = None, *,
          tune_cpu: bool = False, origin: SettingsOrigin | None = None) -> TrainResult:
    """Trains ``config.model`` with Quiet-STaR (the settings: ``TrainConfig``; the stages:
    ``TrainingRecipe``). ``tune_cpu``: on a CPU run, apply ``training.cpu.tune_for_training``
    before the first step (process-wide, never undone; ``quietstar train`` does). ``origin``:
    ``config.resolve_config``'s, named in the settings the run starts by logging."""
    return TrainingRecipe(config, eval_hooks, tune_cpu=tune_cpu, origin=origin).run()
