"""``DistillConfig``: the settings of a distillation run (``quietstar distill``, ``distill()``).

The one source of the command's flags, their help and defaults (``quietstar.utils.settings``),
and of ``distill_config.yaml``, which a run writes into its folder and every checkpoint. Light
on purpose (no torch): the command line reads it before anything heavy is imported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from quietstar.utils.settings import check_field_types, option
from quietstar.utils.errors import QuietStarInputError

DISTILL_CONFIG_NAME = "distill_config.yaml"
EXPORT_DIR = "distilled"  # the run folder's plain Hugging Face model, written at the end


@dataclass
class DistillConfig:
    """A thinking QuietStar model (the teacher) taught to a plain LM (the student, a copy of the
    teacher's LM): the student matches the teacher's next-token distribution with thoughts."""

    teacher: str
    """the QuietStar model to distill: a folder saved by quietstar (a run's
    checkpoint-*/model) or a Hub repo of one"""
    data: str = "builtin:arithmetic"
    """training text: builtin:arithmetic, a .txt/.jsonl/.json/.parquet file or folder, or a
    Hugging Face dataset"""
    num_documents: int | None = option(None, shown_default="all")
    """use the first N documents only"""
    output_dir: str | None = option(None, metavar="DIR", output="folder",
                                    shown_default="runs/distill-<date>-<time>")
    """the run folder: checkpoints, metrics.jsonl and, at the end, the plain model in
    <output_dir>/distilled"""
    seq_len: int = 64
    """tokens per training sequence"""
    batch_size: int = 4
    """sequences per optimiser step"""
    max_steps: int = 100
    """optimiser steps (0: export the teacher's own LM without thoughts, no training)"""
    learning_rate: float = 3e-5
    """peak learning rate (AdamW)"""
    warmup_steps: int = 0
    """steps of linear warm-up to learning_rate"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warm-up, down to min_lr_ratio * learning_rate at max_steps"""
    min_lr_ratio: float = 0.1
    """the schedule's floor, a share of learning_rate"""
    weight_decay: float = 0.0
    """AdamW weight decay of the matrices"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    temperature: float = 1.0
    """temperature T of both distributions in the loss T^2 KL(teacher || student)"""
    next_token_loss_weight: float = 0.0
    """> 0: adds this times the student's plain next-token NLL to the KL"""
    thought_fraction: float = 1.0
    """share of the positions at which the teacher thinks, chosen by its thought_selection
    (1 = every position); elsewhere its base prediction is the target"""
    seed: int = 0
    """seed of the data order and the teacher's thoughts"""
    teacher_cache: str | None = option(None, metavar="DIR", shown_default="none: the teacher runs every step")
    """a folder of the teacher's top-k log-probabilities for every step (cache_top_k of them per
    position, the rest as one bucket): written by one pass of the teacher over the run's
    max_steps batches when absent, then read instead of running the teacher (which is then not
    held in memory); grown (the missing steps written) when made for fewer steps; refused when
    made for another teacher, data, seq_len, batch_size, seed, cache_top_k, temperature or
    thought_fraction"""
    cache_top_k: int = 64
    """k of --teacher-cache: ids kept per position (8k + 4 bytes per token on disk; k = the
    vocabulary size gives the on-the-fly loss)"""
    curriculum: tuple[int, ...] = option((), metavar="K,K,...", shown_default="none: distill the teacher as it is")
    """Fast Quiet-STaR: thought lengths of Quiet-STaR stages run before distillation (e.g.
    8,4): stage i trains the previous stage's model (the first: the teacher) for
    curriculum_steps steps with thoughts of curriculum[i] tokens, as quietstar train does (the
    run settings of --curriculum-config, the teacher's method settings), into
    <output_dir>/stage-<i>; the last stage's model is then the teacher distilled. A finished stage
    is not run again"""
    curriculum_steps: int = 20
    """optimiser steps of each curriculum stage"""
    curriculum_config: str | None = option(None, metavar="YAML",
                                           shown_default="none: the cpu-demo preset, as quietstar train")
    """the run settings of the curriculum's stages (learning rate, schedule, warm-up, mixing head's
    lr multiplier, precision, micro-batching, ...): what quietstar train --config takes, a YAML
    file (layered on the preset its 'base:' names, cpu-demo without one) or a preset's name. The
    stages set the rest: the distillation's data, num_documents, seq_len, batch_size, seed,
    checkpoint_every and keep_checkpoints, model, max_steps = curriculum_steps, output_dir,
    resume, no evaluation, and the teacher's method (a preset's 'quietstar:' settings give way
    to it); a file that sets any of these is refused. A resumed run must keep the run settings
    its stages were trained with"""
    checkpoint_every: int = 50
    """steps between checkpoints (and one at the end)"""
    keep_checkpoints: int = 2
    """checkpoints kept (the latest)"""
    resume: str | None = option(None, shown_default="none: a new run")
    """continue a run: a checkpoint folder, a run folder (its latest checkpoint), or 'latest'
    (the latest in --output-dir; a new run while it holds none)"""
    device: str | None = option(None, shown_default="cuda if available, else cpu")
    """cpu, cuda or auto"""

    def __post_init__(self) -> None:
        check_field_types(self)

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise QuietStarInputError(f"DistillConfig: {message}")

        for name in ("seq_len", "batch_size", "checkpoint_every", "keep_checkpoints", "cache_top_k",
                     "curriculum_steps"):
            value = getattr(self, name)
            need(value >= 1, f"{name} must be >= 1, got {value!r}")
        for name in ("max_steps", "warmup_steps", "seed"):
            value = getattr(self, name)
            need(value >= 0, f"{name} must be >= 0, got {value!r}")
        need(self.seq_len >= 2, f"seq_len must be >= 2 (a token and its successor), got {self.seq_len}")
        need(self.num_documents is None or self.num_documents >= 1,
             f"num_documents must be None or >= 1, got {self.num_documents!r}")
        need(self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning_rate must be finite and > 0, got {self.learning_rate!r}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}")
        need(self.next_token_loss_weight >= 0, f"next_token_loss_weight must be >= 0, got "
             f"{self.next_token_loss_weight!r}")
        need(0 < self.thought_fraction <= 1, f"thought_fraction must be in (0, 1] (1 = every position), got "
             f"{self.thought_fraction!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        need(bool(self.teacher.strip()), "teacher must name a QuietStar model folder or Hub repo")
        need(self.teacher_cache is None or bool(self.teacher_cache.strip()),
             "teacher_cache must name a folder (or be None: the teacher runs every step)")
        need(all(k >= 1 for k in self.curriculum), f"curriculum must list thought lengths >= 1, got "
             f"{list(self.curriculum)}")
        need(self.curriculum_config is None or bool(self.curriculum_config.strip()),
             "curriculum_config must name a YAML file or a preset (or be None: the cpu-demo preset)")
        need(self.curriculum_config is None or bool(self.curriculum),
             f"curriculum_config {self.curriculum_config!r} sets the run settings of the curriculum's stages, "
             "and there is no curriculum: give --curriculum K,K,... too, or drop --curriculum-config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"curriculum": list(self.curriculum)}  # YAML has lists, not tuples

    def save(self, directory: str | Path) -> Path:
        """Writes ``<directory>/distill_config.yaml`` (the run folder or a checkpoint)."""
        path = Path(directory, DISTILL_CONFIG_NAME)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path
