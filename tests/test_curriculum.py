"""The Fast Quiet-STaR curriculum of ``quietstar distill --curriculum``: stages of shrinking thoughts
(each a ``quietstar train`` run that keeps the previous model's head), then distillation from the
last; the export loads with transformers alone; finished stages are not redone, an interrupted one
resumes; the stages' run settings come from --curriculum-config (cpu-demo without one)."""

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
from quietstar.training.config import TrainConfig, differences, load_config
from quietstar.training.curriculum import check_curriculum_config, resolve_stage, run_curriculum, stage_dir, \
    stage_settings
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
    # without --curriculum-config a stage's run settings are the cpu-demo preset's, as before
    stage = TrainConfig.from_dict(TrainConfig.saved_settings(out / "stage-0"))
    own = stage_settings(config(teacher_dir, out), QuietStarConfig.load(teacher_dir), index=0, model="m",
                         folder=out / "stage-0").keys()
    assert {n.split(".")[0] for n in differences(stage, load_config(None))} <= own
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


def test_curriculum_config_gives_the_stages_run_settings_and_is_kept_on_resume(teacher_dir, tmp_path):
    out, settings = tmp_path / "run", tmp_path / "stages.yaml"
    settings.write_text("learning_rate: 1.0e-3\nmixing_head_lr_multiplier: 7\nlr_schedule: constant\n"
                        "warmup_steps: 0\n", encoding="utf-8")
    run_curriculum(config(teacher_dir, out, curriculum=(2,), curriculum_config=str(settings)), out, distilling=False)
    stage = TrainConfig.from_dict(TrainConfig.saved_settings(out / "stage-0"))
    assert (stage.learning_rate, stage.mixing_head_lr_multiplier, stage.lr_schedule) == (1e-3, 7, "constant")
    assert json.loads((out / "stage-0" / "metrics.jsonl").read_text().splitlines()[0])["lr"] == 1e-3
    # the file layers on cpu-demo (its weight decay) under the stage's own settings and the teacher's method
    assert stage.weight_decay == load_config(None).weight_decay and stage.seq_len == 16 and stage.eval_every == 0
    teacher = QuietStarConfig.load(teacher_dir)
    assert stage.quietstar.to_dict() == teacher.to_dict() | {"sampled_thought_tokens": 2}

    # resumed with other run settings (here the default's): refused, whatever the file's name
    with pytest.raises(QuietStarInputError, match=r"other run settings .*learning_rate 0\.001 \(now 3e-05\)"):
        run_curriculum(config(teacher_dir, out, curriculum=(2,), resume="latest"), out, distilling=False)
    with pytest.raises(QuietStarInputError, match="other run settings"):
        distill(config(teacher_dir, out, curriculum=(2,), resume="latest"))
    moved = tmp_path / "same.yaml"
    moved.write_text(settings.read_text(), encoding="utf-8")
    assert Path(run_curriculum(config(teacher_dir, out, curriculum=(2,), curriculum_config=str(moved),
                                      resume="latest"), out, distilling=False)) == stage_model(out, 0, 1)


def test_presets_give_run_settings_only_and_bad_curriculum_configs_are_refused_before_a_stage(teacher_dir,
                                                                                              tmp_path):
    out, method = tmp_path / "run", QuietStarConfig.load(teacher_dir)

    def stage_config(name):
        cfg = config(teacher_dir, out, curriculum_config=name)
        own = stage_settings(cfg, method, index=0, model=str(teacher_dir), folder=stage_dir(out, 0))
        check_curriculum_config(name, own)
        return resolve_stage(cfg, own)[0]

    assert stage_config("cpu-demo") == stage_config(None)
    rlp = stage_config("rlp")  # its run settings; its method settings give way to the teacher's
    assert (rlp.learning_rate, rlp.lr_schedule, rlp.mixing_head_lr_multiplier) == (1e-6, "constant", 1.0)
    assert rlp.quietstar.objective == "quietstar" and rlp.quietstar.sampled_thought_tokens == 2

    method_file, seq_file = tmp_path / "method.yaml", tmp_path / "seq.yaml"
    method_file.write_text("learning_rate: 1.0e-3\nquietstar:\n  policy_loss_weight: 5.0\n", encoding="utf-8")
    seq_file.write_text("base: paper\nseq_len: 128\n", encoding="utf-8")
    for name, message in [(str(tmp_path / "missing.yaml"), "neither a YAML file nor a preset; give a quietstar "
                           "train config file .* or a preset: cpu-demo, defaults"),
                          ("no-such-preset", "neither a YAML file nor a preset"),
                          (str(method_file), "sets quietstar, which every curriculum stage sets itself.*the "
                           "teacher's method.*remove them from the file"),
                          (str(seq_file), "sets seq_len, which every curriculum stage sets itself")]:
        with pytest.raises(QuietStarInputError, match=message):
            distill(config(teacher_dir, out, curriculum_config=name))
        assert not stage_dir(out, 0).exists()
    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("micro_batch_size: 3\n", encoding="utf-8")  # batch_size 2: no multiple of 3
    with pytest.raises(QuietStarInputError, match="not a multiple of micro_batch_size"):
        distill(config(teacher_dir, out, curriculum_config=str(bad_value)))
    assert not stage_dir(out, 0).exists()
    with pytest.raises(QuietStarInputError, match="there is no curriculum: give --curriculum"):
        config(teacher_dir, out, curriculum=(), curriculum_config="cpu-demo")
