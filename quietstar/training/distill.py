"""Distillation: a thinking QuietStar model's gain in a plain LM, at the plain LM's cost.

``DistillRecipe`` (``quietstar distill``, ``distill(DistillConfig)``) trains the student, a copy
of the teacher's LM, to match the teacher's next-token distribution with thoughts:

    teacher   QuietStarForCausalLM.next_token_hidden: thoughts sampled (the teacher's k and
              temperature, at thought_fraction of the positions), mixed hidden states [B, L, d];
              no gradient, no [B, L, V] tensor
    student   the plain LM's final hidden states [B, L, d] (input ids in, as the exported model)
    loss      mean over positions with a next token of T^2 KL(teacher || student)
              (method.distillation.distillation_kl, both heads a chunk of rows at a time)
              + next_token_loss_weight x the student's next-token NLL

By default the teacher's distributions are computed on the fly: exact, no disk, at the price of
the teacher's rollout (k + 1 decoder calls without gradient) per step and the teacher held in
memory beside the student (twice the LM's weights). With ``teacher_cache`` the teacher's top-k
log-probabilities of every step are written once (``training.teacher_cache``: one pass of the
teacher over the max_steps batches the run will read, with the thoughts it would sample) and the
steps read them instead (``method.distillation.top_k_distillation_kl``: the KL on the k ids and
the rest as one bucket); the teacher is then not held during the steps (the student is the
loaded teacher itself, not a copy). Measured costs: benchmarks/README.md ("Distillation").

With ``curriculum`` (Fast Quiet-STaR) ``training.curriculum`` first runs Quiet-STaR stages with
the given thought lengths, each a ``quietstar train`` run in ``<output_dir>/stage-<i>``, and the
last stage's model is the teacher.

The student starts as the teacher's LM (trained to read thoughts, its base prediction already
the teacher's where it does not think) and is a ``QuietStarForCausalLM`` whose START/END vectors
and mixing head stay frozen and unused, so checkpoints are ``training.checkpoint``'s own:
atomic, checksummed, resumed bit for bit (the teacher's thoughts of step s come from
``thought_generator(seed, s, 0)``, the data position and RNG states are restored). At the end
``models.export.export_plain`` writes the student's LM as a plain Hugging Face folder
(``<output_dir>/distilled``).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quietstar.data.corpora import TokenBatches, load_texts
from quietstar.method.config import QUIETSTAR_CONFIG_NAME
from quietstar.method.distillation import distillation_kl, teacher_top_k, top_k_distillation_kl
from quietstar.method.rollout import text_positions
from quietstar.method.targets import training_targets
from quietstar.models.export import DistillFacts, export_plain
from quietstar.models.loading import resolve_device
from quietstar.models.modeling import QuietStarForCausalLM
from quietstar.training import checkpoint
from quietstar.training.components import thought_generator
from quietstar.training.curriculum import run_curriculum
from quietstar.training.distill_config import EXPORT_DIR, DistillConfig
from quietstar.training.metrics import MetricsLogger
from quietstar.training.optim import lr_at, parameter_groups, set_learning_rate
from quietstar.training.run_folder import claim_output_dir, refuse_nested
from quietstar.training.run_lock import RunLock
from quietstar.training.teacher_cache import CacheWriter, TeacherCache, is_complete, weights_sha256
from quietstar.utils.errors import QuietStarInputError

logger = logging.getLogger(__name__)


@dataclass
class DistillResult:
    """What ``distill`` returns."""

    output_dir: Path
    model_dir: Path              # the plain Hugging Face model
    checkpoint: Path | None      # the last checkpoint written (None: no step taken)
    step: int
    metrics: dict[str, Any]      # the last step's record


def check_teacher(teacher: str) -> None:
    """Refuses a local folder that is not a saved QuietStar model before anything loads (a Hub id
    is checked by loading it)."""
    path = Path(teacher).expanduser()
    if path.exists() and not path.is_dir():
        raise QuietStarInputError(f"--teacher {teacher} is a file; give a QuietStar model folder "
                                  "(e.g. a run's checkpoint-*/model)")
    if not path.is_dir():
        return
    if not (path / "config.json").is_file():
        raise QuietStarInputError(f"--teacher {teacher} is not a model folder (no config.json); give a "
                                  "QuietStar model folder (e.g. a run's checkpoint-*/model)")
    if not (path / QUIETSTAR_CONFIG_NAME).is_file():
        raise QuietStarInputError(f"--teacher {teacher} is a plain model, not a QuietStar model "
                                  f"({QUIETSTAR_CONFIG_NAME} is missing): distillation needs a thinking "
                                  "teacher; train one first (quietstar train --model ...) and give its "
                                  "checkpoint-*/model")


def check_output_outside(output: str | Path, teacher: str) -> None:
    """Refuses a run folder inside (or equal to) a local teacher folder: their files would mix."""
    teacher_path = Path(teacher).expanduser()
    if not teacher_path.is_dir():
        return
    out, inside = Path(output).expanduser().resolve(), teacher_path.resolve()
    if out == inside or inside in out.parents:
        raise QuietStarInputError(f"--output-dir {output} lies inside the teacher {teacher}; give a folder "
                                  "outside the teacher's")


class DistillRecipe:
    """A distillation run in named stages (``setup`` runs the curriculum, builds teacher, data,
    teacher cache, student and optimiser; then ``train_step``, ``save_checkpoint``, ``export``);
    ``run()`` calls them in order."""

    def __init__(self, config: DistillConfig):
        self.config = config
        self.device: torch.device | None = None
        self.out_dir: Path | None = None
        self.lock: RunLock | None = None
        self.new_folder: Path | None = None      # created by this run: removed if it fails before a step
        self.resume_from: Path | None = None
        self.teacher_path: str = config.teacher  # the last curriculum stage's model, if any
        self.teacher: QuietStarForCausalLM | None = None  # None during the steps from a cache
        self.cache: TeacherCache | None = None
        self.texts = None
        self.student: QuietStarForCausalLM | None = None
        self.batches: TokenBatches | None = None
        self.batch_iter = None
        self.pending: dict[str, torch.Tensor] | None = None  # the first batch, read by start_data
        self.optimizer: torch.optim.Optimizer | None = None
        self.state: dict[str, Any] | None = None  # the resumed checkpoint's training state
        self.metrics: MetricsLogger | None = None
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.record: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Every stage before the first step, in order; ``train_step`` can run right after."""
        self.setup_run_folder()
        self.setup_teacher()
        self.setup_data()
        self.setup_teacher_cache()
        self.setup_student()
        self.setup_optimizer()
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        self.start_data()
        self.metrics = MetricsLogger(self.out_dir, "none", self.config.to_dict(),
                                     resume_step=self.step if self.state is not None else -1)

    def setup_run_folder(self) -> None:
        cfg = self.config
        check_teacher(cfg.teacher)
        self.resume_from = checkpoint.resolve_resume(cfg.resume, cfg.output_dir) if cfg.resume else None
        if self.resume_from is not None and cfg.max_steps < checkpoint.step_of(self.resume_from):
            raise QuietStarInputError(f"max_steps {cfg.max_steps} is below the step of the resumed checkpoint "
                                      f"{self.resume_from}; give a larger --max-steps")
        if cfg.output_dir:
            out_dir = Path(cfg.output_dir)
        elif self.resume_from is not None:
            out_dir = self.resume_from.parent
        else:
            out_dir = Path("runs") / time.strftime("distill-%Y%m%d-%H%M%S")
        check_output_outside(out_dir, cfg.teacher)
        refuse_nested(out_dir)
        # Before the lock: each stage is a run of its own inside out_dir, which must not be a run yet.
        self.teacher_path = run_curriculum(cfg, out_dir, distilling=self.resume_from is not None)
        self.lock, self.new_folder = claim_output_dir(out_dir, self.resume_from is not None)
        self.out_dir = out_dir
        checkpoint.remove_partial(out_dir)
        cfg.save(out_dir)

    def setup_teacher(self) -> None:
        """The teacher (fp32, eval mode, frozen)."""
        device = resolve_device(self.config.device) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        teacher = QuietStarForCausalLM.from_pretrained(self.teacher_path, dtype=torch.float32)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)

    def token_batches(self) -> TokenBatches:
        """The run's batches from the start (the steps' and the teacher cache's alike)."""
        cfg = self.config
        return TokenBatches(self.texts, self.teacher.tokenizer, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                            name=f"training data {cfg.data!r}")

    def setup_data(self) -> None:
        cfg = self.config
        self.texts = load_texts(cfg.data, seed=cfg.seed, num_documents=cfg.num_documents)
        self.batches = self.token_batches()

    def setup_teacher_cache(self) -> None:
        """With ``teacher_cache``: the cache checked against this run, written first where absent
        (one pass of the teacher over the max_steps batches, as the steps would run it) and grown
        where it holds fewer steps (the pass from its first missing step: a resumed run with a
        larger max_steps)."""
        cfg = self.config
        if cfg.teacher_cache is None:
            return
        vocab = self.teacher.lm.get_output_embeddings().weight.shape[0]
        if cfg.cache_top_k > vocab:
            raise QuietStarInputError(f"cache_top_k {cfg.cache_top_k} exceeds the teacher's vocabulary ({vocab} "
                                      f"rows); give at most {vocab}")
        made_from = {"teacher": self.teacher_path,
                     "teacher_sha256": weights_sha256(self.teacher, self.teacher.config.to_dict()),
                     "data": cfg.data, "num_documents": cfg.num_documents, "seq_len": cfg.seq_len,
                     "batch_size": cfg.batch_size, "seed": cfg.seed, "top_k": cfg.cache_top_k,
                     "temperature": cfg.temperature, "thought_fraction": cfg.thought_fraction,
                     "device": self.device.type}
        cache = TeacherCache(cfg.teacher_cache, made_from) if is_complete(cfg.teacher_cache) else None
        first = cache.steps if cache is not None else 0
        if first < cfg.max_steps:
            started = time.perf_counter()
            writer = CacheWriter(cfg.teacher_cache, made_from, rows_per_step=cfg.batch_size * cfg.seq_len,
                                 extends=cache)
            head = self.teacher.vocab_head()
            # From the start: the steps' batches in the steps' order, the first steps' only checked.
            for step, batch in zip(range(cfg.max_steps), self.token_batches()):
                if step < first:
                    cache.check_text(step, batch)  # the old part still holds for this run's text
                    continue
                batch = {k: v.to(self.device) for k, v in batch.items()}
                teacher_hidden, _, valid = self.teacher_states(batch, step)
                writer.add(batch, *teacher_top_k(head, teacher_hidden[valid], cfg.cache_top_k, cfg.temperature))
            writer.finish()
            logger.info(f"teacher cache: steps {first + 1}..{cfg.max_steps} written to {cfg.teacher_cache} in "
                        f"{time.perf_counter() - started:.1f} s")
            cache = TeacherCache(cfg.teacher_cache, made_from)
        self.cache = cache

    def setup_student(self) -> None:
        """The student, whose LM alone trains: a copy of the teacher, or with a teacher cache the
        loaded teacher itself (no longer needed as a teacher)."""
        if self.cache is not None:
            student, self.teacher = self.teacher, None
        else:
            student = copy.deepcopy(self.teacher)
        student.requires_grad_(False)
        student.lm.requires_grad_(True)  # START/END and the mixing head: not part of the plain model
        self.student = student.train()

    def setup_optimizer(self) -> None:
        cfg = self.config
        groups = [g for g in parameter_groups(self.student, cfg.learning_rate, cfg.weight_decay) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed checkpoint must match: the model's shape and the run's data and teacher."""
        text, cfg = self.student.lm.config.get_text_config(), self.config
        stages = {"curriculum": list(cfg.curriculum), "curriculum_steps": cfg.curriculum_steps} if cfg.curriculum else {}
        return {"model_type": text.model_type, "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
                "num_hidden_layers": text.num_hidden_layers, "teacher": cfg.teacher, "data": cfg.data,
                "seed": cfg.seed, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, **stages}

    def load_checkpoint(self, path: Path) -> None:
        self.state = checkpoint.load_checkpoint(path, self.student, self.fingerprint(), optimizer=self.optimizer)
        self.batches.load_state_dict(self.state["data"])
        self.step = int(self.state["step"])
        self.last_checkpoint = path

    def start_data(self) -> None:
        """Reads the first batch (too little data fails here, before any step), then restores the
        resumed run's RNG states: nothing random may happen between them and the first step."""
        self.batch_iter = iter(self.batches)
        if self.step < self.config.max_steps:
            self.pending = next(self.batch_iter)
        if self.state is not None:
            checkpoint.restore_rng(self.state["rng"])

    # ------------------------------------------------------------------ steps
    def teacher_states(self, batch: dict[str, torch.Tensor], step: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's mixed next-token states of step ``step`` [B, L, d] (its thoughts from
        thought_generator(seed, step, 0)), the targets x_{i+1} [B, L] and which exist [B, L]."""
        cfg = self.config
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets, valid = training_targets(ids, mask, batch["labels"], 1)
        teacher_hidden = self.teacher.next_token_hidden(
            ids, mask, generator=thought_generator(cfg.seed, step, 0, self.device),
            thought_fraction=cfg.thought_fraction)                        # [B, L, d]
        return teacher_hidden, targets[..., 0], valid[..., 0]

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distillation loss of one batch and its detached metrics (``kl``, ``student_nll``)."""
        cfg = self.config
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.student.lm.get_decoder()(input_ids=ids, attention_mask=mask,
                                               position_ids=text_positions(mask)).last_hidden_state
        head = self.student.vocab_head().unmasked()  # the exported model predicts over all its rows
        if self.cache is not None:
            targets, valid = training_targets(ids, mask, batch["labels"], 1)
            targets, valid = targets[..., 0], valid[..., 0]               # [B, L]: x_{i+1}, has one
            top_ids, top_logprobs, rest = (t.to(self.device) for t in self.cache.read(step, batch))  # [N, k], [N]
            kl = top_k_distillation_kl(head, hidden[valid], top_ids, top_logprobs, rest, cfg.temperature)
        else:
            teacher_hidden, targets, valid = self.teacher_states(batch, step)
            kl = distillation_kl(head, hidden[valid], self.teacher.vocab_head(), teacher_hidden[valid],
                                 cfg.temperature)                         # [N]
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.next_token_loss_weight > 0):
            nll = -head.logprobs(hidden[valid], targets[valid]).mean()
        loss = kl.mean() + (cfg.next_token_loss_weight * nll if cfg.next_token_loss_weight > 0 else 0.0)
        return loss, {"kl": kl.mean().detach(), "student_nll": nll.detach()}

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimiser step (``step`` 0-based); returns its record."""
        cfg = self.config
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        set_learning_rate(self.optimizer, lr)
        batch = self.pending if self.pending is not None else next(self.batch_iter)
        self.pending = None
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss, metrics = self.loss(batch, step)
        loss.backward()
        params = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        record = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in metrics.items()},
                  "lr": lr, "grad_norm": grad_norm}
        if math.isfinite(record["loss"]) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            record["skipped"] = True
            logger.warning(f"step {step + 1}: non-finite loss or gradient ({record['loss']}, {grad_norm}); skipped")
        self.optimizer.zero_grad(set_to_none=True)
        record["step_time_s"] = time.perf_counter() - t0
        return record

    def save_checkpoint(self, step: int) -> Path:
        state = {"step": step, "optimizer": self.optimizer.state_dict(), "rng": checkpoint.capture_rng(),
                 "data": self.batches.state_dict(), "fingerprint": self.fingerprint(), "nonfinite_in_a_row": 0}
        self.last_checkpoint = checkpoint.save_checkpoint(self.out_dir, step, self.student, training_state=state,
                                                          config=self.config, keep=self.config.keep_checkpoints)
        return self.last_checkpoint

    def export(self) -> Path:
        """The student's LM as a plain Hugging Face folder, ``<output_dir>/distilled``."""
        cfg, teacher = self.config, self.student  # the student: a copy of the teacher, same config and tokenizer
        facts = DistillFacts(teacher=self.teacher_path, data=cfg.data, steps=self.step,
                             tokens_per_step=cfg.batch_size * cfg.seq_len, temperature=cfg.temperature,
                             next_token_loss_weight=cfg.next_token_loss_weight,
                             thought_fraction=cfg.thought_fraction,
                             thought_tokens=teacher.config.sampled_thought_tokens)
        meta = (teacher.config.start_thought_token, teacher.config.end_thought_token)
        return export_plain(self.student.lm, teacher.tokenizer, self.out_dir / EXPORT_DIR, meta_tokens=meta,
                            facts=facts)

    # ------------------------------------------------------------------ the loop
    def run(self) -> DistillResult:
        """``setup``, the steps (a checkpoint every ``checkpoint_every`` and at the end), ``export``."""
        cfg = self.config
        try:
            self.setup()
            while self.step < cfg.max_steps:
                self.record = self.train_step(self.step)
                self.step += 1
                self.metrics.log(self.record)
                logger.info(f"step {self.step}/{cfg.max_steps}: kl {self.record['kl']:.4f}, student nll "
                            f"{self.record['student_nll']:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint(self.step)
            model_dir = self.export()
        except BaseException:
            if self.new_folder is not None and self.lock is not None and self.last_checkpoint is None:
                shutil.rmtree(self.new_folder, ignore_errors=True)  # bad teacher or data: leave nothing
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
            if self.lock is not None:
                self.lock.release()
        return DistillResult(self.out_dir, model_dir, self.last_checkpoint, self.step, self.record)


def distill(config: DistillConfig) -> DistillResult:
    """Distills ``config.teacher`` into a plain LM (the settings: ``DistillConfig``; the stages:
    ``DistillRecipe``); the model is in ``result.model_dir``, metrics in ``<output_dir>/metrics.jsonl``."""
    return DistillRecipe(config).run()

