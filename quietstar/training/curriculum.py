"""The Fast Quiet-STaR curriculum before distillation (``DistillConfig.curriculum``): Quiet-STaR
stages with shrinking thoughts, each a ``quietstar train`` run, the last one's model the teacher.

    stage i   TrainingRecipe over <output_dir>/stage-<i>: the previous stage's model (stage 0: the
              teacher) with its learned START/END vectors and mixing head, trained
              curriculum_steps steps with k = curriculum[i] thought tokens. Settings, in layers
              as ``quietstar train --config`` resolves them (``resolve_config``): the run
              settings of ``curriculum_config`` (a YAML file over its base preset, or a preset;
              none: the cpu-demo preset, what a new ``quietstar train`` run starts from), under
              the stage's own (``stage_settings``): the teacher's own QuietStarConfig for the
              method with sampled_thought_tokens = k, the distillation's data, num_documents,
              seq_len, batch_size, seed, checkpoint_every and keep_checkpoints, and no held-out
              evaluation (the distillation has none either)
    teacher   the last stage's latest checkpoint-*/model

The method is the teacher's: a preset's ``quietstar:`` settings give way to it, as cpu-demo's
always did, and a file of the user's that sets any of the stage's own settings is refused
rather than silently overruled (``check_curriculum_config``): its method settings would change
what the teacher learned, mid-curriculum, and the rest are the distillation's flags.

A stage whose latest checkpoint is at curriculum_steps is done and not run again; one with an
earlier checkpoint is resumed from it (``--resume`` given to ``quietstar distill``), so an
interrupted curriculum continues where it stopped. A stage checkpoint trained with other thoughts,
further, or with other run settings than ``curriculum_config`` now gives is refused
(``stage_model``; the settings are compared, not the file's name). Stages run where ``quietstar
train`` runs (accelerate's device: CUDA when available), whatever ``device`` the distillation is
given. Like any ``quietstar train --model <saved model>`` run, a stage continues from the previous
stage's START/END vectors and mixing head (``components.build_model``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from quietstar.method.config import QuietStarConfig
from quietstar.training import checkpoint
from quietstar.training.config import BASE_KEY, SettingsOrigin, TrainConfig, config_file_path, differences, \
    names_preset, presets, resolve_config
from quietstar.training.distill_config import DistillConfig
from quietstar.training.recipe import TrainingRecipe
from quietstar.utils.errors import QuietStarInputError
from quietstar.utils.settings import read_yaml

logger = logging.getLogger(__name__)

STAGE_DIR = "stage-{}"


def stage_dir(output_dir: Path, index: int) -> Path:
    return output_dir / STAGE_DIR.format(index)


def stage_settings(config: DistillConfig, method: QuietStarConfig, *, index: int, model: str,
                   folder: Path) -> dict[str, Any]:
    """Stage ``index``'s own settings, over ``curriculum_config``'s: ``model`` trained into
    ``folder`` with the teacher's ``method`` at k = curriculum[index], on the distillation's data
    and batches; as a new run (``run_curriculum`` resumes a started one)."""
    return {"model": model, "data": config.data, "num_documents": config.num_documents,
            "seq_len": config.seq_len, "batch_size": config.batch_size, "seed": config.seed,
            "max_steps": config.curriculum_steps, "output_dir": str(folder),
            "checkpoint_every": config.checkpoint_every, "keep_checkpoints": config.keep_checkpoints,
            "eval_every": 0, "resume": None,
            "quietstar": replace(method, sampled_thought_tokens=config.curriculum[index]).to_dict()}


def check_curriculum_config(name: str | None, stage_own: dict[str, Any]) -> None:
    """Refuses a ``curriculum_config`` that is neither a YAML file nor a preset, or a file of the
    user's that sets one of the settings each stage sets itself (``stage_own``'s): it would be
    overruled in silence. A shipped preset's are overruled (its run settings are what it gives)."""
    if name is None:
        return
    try:
        path = config_file_path(name)
    except FileNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise QuietStarInputError(f"--curriculum-config {name}: neither a YAML file nor a preset; give a "
                                  "quietstar train config file (the stages' run settings) or a preset: "
                                  f"{', '.join(presets())}")
    if names_preset(name):
        return
    clash = [key for key in read_yaml(path) if key != BASE_KEY and key in stage_own]
    if clash:
        raise QuietStarInputError(f"--curriculum-config {name} sets {', '.join(clash)}, which every curriculum stage "
                                  "sets itself: the distillation's data, num_documents, seq_len, batch_size, seed, "
                                  "checkpoint_every and keep_checkpoints, the previous stage's model, max_steps = "
                                  "curriculum_steps, output_dir, resume, eval_every 0, and the teacher's method "
                                  "('quietstar:', with k from --curriculum); remove them from the file (give the "
                                  "distillation's with its flags)")


def resolve_stage(config: DistillConfig, stage_own: dict[str, Any]) -> tuple[TrainConfig, SettingsOrigin]:
    """A stage's ``TrainConfig``: ``curriculum_config``'s settings < the stage's own, as
    ``quietstar train --config`` layers them (a resumed stage: its saved settings < ...)."""
    return resolve_config(config.curriculum_config, stage_own, resumed_settings=checkpoint.resumed_settings,
                          overrides_label="quietstar distill --curriculum")


def stage_model(folder: Path, steps: int, thought_tokens: int, *, expected: TrainConfig,
                stage_own: Collection[str]) -> Path | None:
    """A finished stage's model folder (None: not started or not finished); refused when the stage
    was trained with other thoughts, or further, than the curriculum now gives, or with other run
    settings than ``expected`` (the stage resolved afresh from the curriculum settings now given)
    outside ``stage_own`` (the stage's own settings, ``stage_settings``'s names)."""
    latest = checkpoint.latest_checkpoint(folder)
    if latest is None:
        return None
    model, step = latest / checkpoint.MODEL_DIR, checkpoint.step_of(latest)
    k = QuietStarConfig.load(model).sampled_thought_tokens
    if k != thought_tokens or step > steps:
        raise QuietStarInputError(f"{folder} holds a stage of {step} steps with {k} thought tokens, not {steps} "
                                  f"steps with {thought_tokens}: resume with the curriculum and curriculum_steps "
                                  "the run was started with, or choose another --output-dir")
    # The stage's own settings (model path, max_steps, output_dir, ...) may differ on resume; its
    # run settings, from curriculum_config, may not.
    trained = TrainConfig.from_dict(TrainConfig.saved_settings(latest))
    changed = {name: pair for name, pair in differences(trained, expected).items()
               if name.split(".")[0] not in stage_own}
    if changed:
        detail = ", ".join(f"{name} {a!r} (now {b!r})" for name, (a, b) in changed.items())
        raise QuietStarInputError(f"{folder} holds a stage trained with other run settings than --curriculum-config "
                                  f"now gives ({detail}): resume with the curriculum_config the run was started "
                                  "with, or choose another --output-dir")
    return model if step == steps else None


def run_curriculum(config: DistillConfig, output_dir: Path, *, distilling: bool) -> str:
    """Runs the stages not yet done into ``output_dir/stage-<i>``; returns the teacher of the
    distillation: the last stage's model folder (``config.teacher`` without a curriculum).
    ``distilling``: the distillation in ``output_dir`` has checkpoints already, so every stage
    must be finished. ``curriculum_config`` is checked before any stage runs."""
    teacher = config.teacher
    if not config.curriculum:
        return teacher
    if not Path(teacher).expanduser().is_dir():
        raise QuietStarInputError(f"--curriculum needs a local teacher folder, not {teacher}: download it first "
                                  "(hf download REPO --local-dir DIR) and give the folder")
    method = QuietStarConfig.load(Path(teacher).expanduser())
    check_curriculum_config(config.curriculum_config, stage_settings(config, method, index=0, model=teacher,
                                                                     folder=stage_dir(output_dir, 0)))
    for i, k in enumerate(config.curriculum):
        folder = stage_dir(output_dir, i)
        own = stage_settings(config, method, index=i, model=teacher, folder=folder)
        done = stage_model(folder, config.curriculum_steps, k, expected=resolve_stage(config, own)[0],
                           stage_own=own.keys())
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
        train_config, origin = resolve_stage(config, own | {"resume": "latest" if started else None})
        result = TrainingRecipe(train_config, origin=origin).run()
        if result.interrupted:
            raise KeyboardInterrupt(f"curriculum stage {i} stopped at step {result.step}; continue with "
                                    f"--resume latest --output-dir {output_dir}")
        teacher = str(result.checkpoint / checkpoint.MODEL_DIR)
    return teacher
