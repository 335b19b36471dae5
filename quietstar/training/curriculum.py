"""The Fast Quiet-STaR curriculum before distillation (``DistillConfig.curriculum``): Quiet-STaR
stages with shrinking thoughts, each a ``quietstar train`` run, the last one's model the teacher.

    stage i   TrainingRecipe over <output_dir>/stage-<i>: the previous stage's model (stage 0: the
              teacher) with its learned START/END vectors and mixing head, trained
              curriculum_steps steps with k = curriculum[i] thought tokens. Settings: the
              cpu-demo preset (what a new ``quietstar train`` run starts from) for the run, the
              teacher's own QuietStarConfig for the method with sampled_thought_tokens = k, and
              the distillation's data, num_documents, seq_len, batch_size, seed,
              checkpoint_every and keep_checkpoints; no held-out evaluation (the distillation
              has none either)
    teacher   the last stage's latest checkpoint-*/model

A stage whose latest checkpoint is at curriculum_steps is done and not run again; one with an
earlier checkpoint is resumed from it (``--resume`` given to ``quietstar distill``), so an
interrupted curriculum continues where it stopped. Stages run where ``quietstar train`` runs
(accelerate's device: CUDA when available), whatever ``device`` the distillation is given.
Like any ``quietstar train --model <saved model>`` run, a stage continues from the previous
stage's START/END vectors and mixing head (``components.build_model``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from quietstar.method.config import QuietStarConfig
from quietstar.training import checkpoint
from quietstar.training.config import resolve_config
from quietstar.training.distill_config import DistillConfig
from quietstar.training.recipe import TrainingRecipe
from quietstar.utils.errors import QuietStarInputError

logger = logging.getLogger(__name__)

STAGE_DIR = "stage-{}"


def stage_dir(output_dir: Path, index: int) -> Path:
    return output_dir / STAGE_DIR.format(index)


def stage_model(folder: Path, steps: int, thought_tokens: int) -> Path | None:
    """A finished stage's model folder (None: not started or not finished); refused when the stage
    was trained with other thoughts, or further, than the curriculum now gives."""
    latest = checkpoint.latest_checkpoint(folder)
    if latest is None:
        return None
    model, step = latest / checkpoint.MODEL_DIR, checkpoint.step_of(latest)
    k = QuietStarConfig.load(model).sampled_thought_tokens
    if k != thought_tokens or step > steps:
        raise QuietStarInputError(f"{folder} holds a stage of {step} steps with {k} thought tokens, not {steps} "
                                  f"steps with {thought_tokens}: resume with the curriculum and curriculum_steps "
                                  "the run was started with, or choose another --output-dir")
    return model if step == steps else None


def run_curriculum(config: DistillConfig, output_dir: Path, *, distilling: bool) -> str:
    """Runs the stages not yet done into ``output_dir/stage-<i>``; returns the teacher of the
    distillation: the last stage's model folder (``config.teacher`` without a curriculum).
    ``distilling``: the distillation in ``output_dir`` has checkpoints already, so every stage
    must be finished."""
    teacher = config.teacher
    if not config.curriculum:
        return teacher
    if not Path(teacher).expanduser().is_dir():
        raise QuietStarInputError(f"--curriculum needs a local teacher folder, not {teacher}: download it first "
                                  "(hf download REPO --local-dir DIR) and give the folder")
    method = QuietStarConfig.load(Path(teacher).expanduser())
    for i, k in enumerate(config.curriculum):
        folder = stage_dir(output_dir, i)
        done = stage_model(folder, config.curriculum_steps, k)
        if done is not None:
            logger.info(f"curriculum stage {i} (k = {k}) is done: {done}")
            teacher = str(done)
            continue
        started = checkpoint.latest_checkpoint(folder) is not None
        if distilling:
            raise QuietStarInputError(f"{output_dir} holds distillation checkpoints but its curriculum stage {folder} "
                                      f"is not finished at {config.curriculum_steps} steps: resume with the "
                                      "curriculum settings the run was started with")
        if started and not config.resume:
            raise QuietStarInputError(f"{output_dir} already holds a curriculum stage ({folder}); continue the run "
                                      f"with --resume latest --output-dir {output_dir}, or choose another --output-dir")
        logger.info(f"curriculum stage {i}: {config.curriculum_steps} steps with k = {k} from {teacher}")
        settings = {"model": teacher, "data": config.data, "num_documents": config.num_documents,
                    "seq_len": config.seq_len, "batch_size": config.batch_size, "seed": config.seed,
                    "max_steps": config.curriculum_steps, "output_dir": str(folder),
                    "checkpoint_every": config.checkpoint_every, "keep_checkpoints": config.keep_checkpoints,
                    "eval_every": 0, "resume": "latest" if started else None,
                    "quietstar": replace(method, sampled_thought_tokens=k).to_dict()}
        train_config, origin = resolve_config(None, settings, resumed_settings=checkpoint.resumed_settings,
                                              overrides_label="quietstar distill --curriculum")
        result = TrainingRecipe(train_config, origin=origin).run()
        if result.interrupted:
            raise KeyboardInterrupt(f"curriculum stage {i} stopped at step {result.step}; continue with "
                                    f"--resume latest --output-dir {output_dir}")
        teacher = str(result.checkpoint / checkpoint.MODEL_DIR)
    return teacher
