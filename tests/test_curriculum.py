"""The Fast Quiet-STaR curriculum of ``quietstar distill --curriculum``: stages of shrinking thoughts
(each a ``quietstar train`` run that keeps the previous model's head), then distillation from the
last; the export loads with transformers alone; finished stages are not redone, an interrupted one
resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import distill_config
from quietstar.method.config import QuietStarConfig
from quietstar.models.saved_model import HEAD_WEIGHTS_NAME
from quietstar.training.curriculum import run_curriculum
from quietstar.training.distill import distill
from quietstar.training.distill_config import EXPORT_DIR, DistillConfig
from quietstar.utils.errors import QuietStarInputError
from test_distill import PLAIN_LOAD


def config(teacher_dir, out, **kw) -> DistillConfig:
    """conftest's tiny distillation run: one step, after two one-step stages thinking 2, then 1 token."""
    return distill_config(teacher_dir, out, **(dict(max_steps=1, curriculum=(2, 1), curriculum_steps=1) | kw))


def stage_model(out: Path, stage: int, step: int) -> Path:
    return out / f"stage-{stage}" / f"checkpoint-{step:06d}" / "model"


def test_stages_then_distillation_and_the_export_loads_alone(teacher_dir, tmp_path):
    out = tmp_path / "run"
    result = distill(config(teacher_dir, out))
    assert result.step == 1
    for stage, k in enumerate((2, 1)):
        assert QuietStarConfig.load(stage_model(out, stage, 1)).sampled_thought_tokens == k
    # stage 0 starts from the teacher's head (not a fresh one at w = 0): one step moves it little
    teacher_head, head = (load_file(folder / HEAD_WEIGHTS_NAME) for folder in (teacher_dir, stage_model(out, 0, 1)))
    assert teacher_head.keys() == head.keys()
    assert max((teacher_head[k] - head[k]).abs().max().item() for k in head) < 0.05
    assert any(teacher_head[k].abs().max() > 0.3 for k in head)  # the teacher's head is far from a fresh one
    # the distillation's teacher is the last stage's model
    assert f"`{stage_model(out, 1, 1)}`, which thought 1 tokens" in (out / EXPORT_DIR / "README.md").read_text()
    done = subprocess.run([sys.executable, "-I", "-c", PLAIN_LOAD, str(result.model_dir), "3"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["calls"] == 3

    # resumed: the finished stages are not run again, the distillation continues
    before = {p: p.stat().st_mtime_ns for p in out.glob("stage-*/**/*") if p.is_file()}
    more = distill(config(teacher_dir, out, max_steps=2, resume="latest"))
    assert more.step == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("stage-*/**/*") if p.is_file()} == before
    with pytest.raises(QuietStarInputError, match="stage-0 is not finished at 2 steps"):
        distill(config(teacher_dir, out, max_steps=3, resume="latest", curriculum_steps=2))


def test_an_interrupted_stage_resumes_and_a_new_run_refuses_a_started_one(teacher_dir, tmp_path):
    out = tmp_path / "run"
    # stage 0 stopped after its first of two steps: what run_curriculum leaves after 1 step
    run_curriculum(config(teacher_dir, out, curriculum=(2,), curriculum_steps=1), out, distilling=False)
    with pytest.raises(QuietStarInputError, match="already holds a curriculum stage"):
        distill(config(teacher_dir, out, curriculum=(2,), curriculum_steps=2))
    with pytest.raises(QuietStarInputError, match="a stage of 1 steps with 2 thought tokens, not 2 steps with 3"):
        run_curriculum(config(teacher_dir, out, curriculum=(3,), curriculum_steps=2, resume="latest"), out,
                       distilling=False)
    teacher = run_curriculum(config(teacher_dir, out, curriculum=(2,), curriculum_steps=2, resume="latest"), out,
                             distilling=False)
    assert Path(teacher) == stage_model(out, 0, 2)
    steps = [json.loads(line)["step"] for line in (out / "stage-0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    with pytest.raises(QuietStarInputError, match="not 2 steps with 3"):
        run_curriculum(config(teacher_dir, out, curriculum=(3,), curriculum_steps=2), out, distilling=False)
    with pytest.raises(QuietStarInputError, match="curriculum must list thought lengths >= 1"):
        config(teacher_dir, out, curriculum=(2, 0))
