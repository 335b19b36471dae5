"""Bad input refused early and clearly: setting types and finiteness (YAML, from_dict, flags),
thought tokens that already exist in the tokenizer, and resume checks."""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass, fields
from typing import Literal

import pytest
import yaml
from conftest import make_lm, make_model, make_tokenizer, random_text

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.training.checkpoint import list_checkpoints, resumed_settings
from quietstar.cli import train as command
from quietstar.training.recipe import TrainConfig, train
from quietstar.training.config import INFINITE_OK, load_config
from quietstar.utils.settings import check_field_types


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("quietstar.training.recipe.plot_training_curves", lambda *args: None)


def float_fields(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.type in ("float", "float | None")]


def tiny_settings(model_dir, out, **kw) -> dict:
    return {"model": str(model_dir), "output_dir": str(out), "seq_len": 16, "batch_size": 2,
            "micro_batch_size": 1, "max_steps": 2, "learning_rate": 1e-3, "warmup_steps": 0,
            "eval_every": 0, "sample_every": 0, "num_documents": 40,
            "quietstar": {"sampled_thought_tokens": 2, "ahead_tokens": 2}, **kw}


def folder_snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_command(argv, capsys) -> tuple[int, str]:
    code = command.main(argv)
    err = capsys.readouterr().err
    return code, err


# ----------------------------------------------------------------------------- types
def test_yaml_numbers_pyyaml_reads_as_strings_become_floats(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 3e-5\nlora_alpha: 16\nquietstar:\n"
                                       "  policy_loss_weight: 1e6\n  thought_temperature: 1\n")
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["learning_rate"] == "3e-5"
    config = load_config(tmp_path / "run.yaml")
    assert config.learning_rate == 3e-5 and isinstance(config.learning_rate, float)
    assert config.lora_alpha == 16.0 and isinstance(config.lora_alpha, float)  # an int for a float
    assert config.quietstar.policy_loss_weight == 1e6
    assert isinstance(config.quietstar.thought_temperature, float)


def test_yaml_booleans_optional_nulls_and_literals_that_fit_are_kept(tmp_path):
    (tmp_path / "run.yaml").write_text("activation_checkpointing: true\ntext_field: null\n"
                                       "num_documents: null\nlr_schedule: linear\n"
                                       "policy_max_grad_norm: null\nmax_grad_norm: .inf\n"
                                       "quietstar:\n  drop_negative_rewards: false\n")
    config = load_config(tmp_path / "run.yaml")
    assert config.activation_checkpointing is True and config.quietstar.drop_negative_rewards is False
    assert config.text_field is None and config.num_documents is None and config.policy_max_grad_norm is None
    assert config.lr_schedule == "linear" and config.max_grad_norm == math.inf


@pytest.mark.parametrize("settings, message", [
    ({"activation_checkpointing": "no"}, "TrainConfig: activation_checkpointing must be true or false.*got 'no'"),
    ({"activation_checkpointing": "true"}, "activation_checkpointing must be true or false.*got 'true'"),
    ({"activation_checkpointing": "yes"}, "activation_checkpointing must be true or false.*got 'yes'"),
    ({"activation_checkpointing": 1}, "activation_checkpointing must be true or false.*got 1"),
    ({"quietstar": {"drop_negative_rewards": "false"}},
     "QuietStarConfig: drop_negative_rewards must be true or false.*got 'false'"),
    ({"seq_len": 2.5}, "TrainConfig: seq_len must be a whole number \\(int\\), got 2.5"),
    ({"seq_len": "abc"}, "TrainConfig: seq_len must be a number \\(int\\), got 'abc'"),
    ({"max_steps": True}, "max_steps must be a number \\(int\\), got True"),
    ({"quietstar": {"ahead_tokens": 1.5}}, "QuietStarConfig: ahead_tokens must be a whole number"),
    ({"learning_rate": "fast"}, "learning_rate must be a number \\(float\\), got 'fast'"),
    ({"learning_rate": None}, "learning_rate must be float, not null"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of cosine, linear, constant; got 'step'"),
    ({"quietstar": {"reward_source": "other"}}, "QuietStarConfig: reward_source must be one of mixed, thought; got 'other'"),
    ({"quietstar": 5}, "TrainConfig: quietstar must be a mapping of QuietStarConfig settings.*got 5"),
    ({"quietstar": "fast"}, "quietstar must be a mapping"),
    ({"model": 5}, "TrainConfig: model must be a string, got 5"),
    ({"quietstar": {"start_thought_token": 7}}, "start_thought_token must be a string, got 7"),
])
def test_values_of_the_wrong_type_are_refused_naming_field_and_value(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(settings)


@pytest.mark.parametrize("cls", [TrainConfig, QuietStarConfig])
def test_every_literal_field_refuses_other_values_naming_field_value_and_choices(cls):
    hints = typing.get_type_hints(cls)
    literal = [f.name for f in fields(cls) if typing.get_origin(hints[f.name]) is Literal]
    assert literal
    for name in literal:
        choices = ", ".join(typing.get_args(hints[name]))
        for bad in ("no-such-choice", 5):
            with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}: {name} must be one of "
                                                           f"{choices}; got {bad!r}")):
                cls.from_dict({name: bad})


def test_literal_choices_are_checked_from_the_annotation_alone():
    @dataclass
    class Settings:
        mode: Literal["x", "y"] = "x"
        level: Literal[1, 2] = 1

        def __post_init__(self):
            check_field_types(self)

    assert (Settings(mode="y", level=2).mode, Settings(mode="y", level=2).level) == ("y", 2)
    with pytest.raises(ValueError, match=re.escape("Settings: mode must be one of x, y; got 'z'")):
        Settings(mode="z")
    with pytest.raises(ValueError, match=re.escape("Settings: level must be one of 1, 2; got True")):
        Settings(level=True)  # equal to 1, but not an int choice


def test_quietstar_config_from_dict_checks_types_too():
    assert QuietStarConfig.from_dict({"thought_temperature": "5e-1"}).thought_temperature == 0.5
    with pytest.raises(ValueError, match="QuietStarConfig: mixing_weight_bounded must be true or false"):
        QuietStarConfig.from_dict({"mixing_weight_bounded": "no"})
    with pytest.raises(ValueError, match="sampled_thought_tokens must be a whole number"):
        QuietStarConfig.from_dict({"sampled_thought_tokens": 2.5})


# ----------------------------------------------------------------------------- finiteness
@pytest.mark.parametrize("name", float_fields(QuietStarConfig))
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "inf", "nan"])
def test_every_method_float_must_be_finite(name, bad):
    with pytest.raises(ValueError, match=f"QuietStarConfig: {name} must be a (finite )?number"):
        QuietStarConfig.from_dict({name: bad})


@pytest.mark.parametrize("name", float_fields(TrainConfig))
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_every_training_float_is_finite_but_the_clipping_norms_may_be_inf(name, bad):
    if name in INFINITE_OK and bad == math.inf:
        assert getattr(TrainConfig.from_dict({name: bad}), name) == math.inf  # inf: no clipping
        return
    with pytest.raises(ValueError, match=f"TrainConfig: {name} must be a (finite )?number"):
        TrainConfig.from_dict({name: bad})


def test_the_float_fields_are_the_ones_checked():
    assert set(float_fields(QuietStarConfig)) == {
        "thought_temperature", "ema_decay", "policy_loss_weight", "policy_logprob_temperature",
        "base_loss_weight", "mixed_loss_weight", "meta_token_lr_multiplier", "thought_fraction",
        "thought_loss_weight", "clip_eps_low", "clip_eps_high", "next_token_loss_weight"}
    assert set(float_fields(TrainConfig)) == {
        "learning_rate", "mixing_head_lr_multiplier", "weight_decay", "min_lr_ratio",
        "max_grad_norm", "policy_max_grad_norm", "lora_alpha"}
    assert set(INFINITE_OK) == {"max_grad_norm", "policy_max_grad_norm"}


# ----------------------------------------------------------------------------- the command
@pytest.fixture
def recorded(monkeypatch):
    seen = []
    monkeypatch.setattr("quietstar.training.recipe.train", lambda config, **kw: seen.append(config) or types.SimpleNamespace(interrupted=False))
    return seen


@pytest.mark.parametrize("yaml_text, message", [
    ("activation_checkpointing: 'no'\n", "activation_checkpointing must be true or false"),
    ("seq_len: 2.5\n", "seq_len must be a whole number"),
    ("quietstar: 5\n", "quietstar must be a mapping of QuietStarConfig settings"),
    ("quietstar:\n  policy_logprob_temperature: .inf\n", "policy_logprob_temperature must be a finite number"),
    ("quietstar:\n  meta_token_lr_multiplier: .nan\n", "meta_token_lr_multiplier must be a number, got NaN"),
    ("lr_schedule: step\n", "lr_schedule must be one of"),
])
def test_bad_yaml_values_exit_2_in_one_line(tmp_path, capsys, recorded, yaml_text, message):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    code, err = run_command(["--config", str(tmp_path / "bad.yaml")], capsys)
    assert code == 2 and not recorded
    assert err.strip().splitlines()[-1].startswith("quietstar train: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag, message", [
    ("--policy-logprob-temperature", "policy_logprob_temperature must be a finite number, got inf"),
    ("--meta-token-lr-multiplier", "meta_token_lr_multiplier must be a finite number, got inf"),
    ("--learning-rate", "learning_rate must be a finite number, got inf"),
    ("--lora-alpha", "lora_alpha must be a finite number, got inf"),
])
def test_infinite_flags_exit_2(capsys, recorded, flag, message):
    code, err = run_command([flag, "inf"], capsys)
    assert code == 2 and not recorded and message in err and "Traceback" not in err
    code, err = run_command([flag, "nan"], capsys)
    assert code == 2 and not recorded and "got NaN" in err


def test_infinite_clipping_norm_is_still_accepted(capsys, recorded):
    assert command.main(["--max-grad-norm", "inf", "--policy-max-grad-norm", "inf"]) == 0
    assert recorded[-1].max_grad_norm == math.inf and recorded[-1].policy_max_grad_norm == math.inf


# ----------------------------------------------------------------------------- thought settings
def test_negative_thought_settings_are_refused_by_the_model():
    model = make_model()
    ids = random_text(1, 6)
    with pytest.raises(ValueError, match="thought_temperature must be a finite number >= 0.*-1"):
        model.sample_thoughts(ids, temperature=-1)
    with pytest.raises(ValueError, match="thought_temperature must be a finite number >= 0"):
        model.sample_thoughts(ids, temperature=math.inf)
    with pytest.raises(ValueError, match="thought_tokens must be an int >= 0.*-1"):
        model.sample_thoughts(ids, num_tokens=-1)
    with pytest.raises(ValueError, match="thought_temperature must be a finite number >= 0"):
        model.generate(ids, max_new_tokens=1, thought_temperature=-1)
    with pytest.raises(ValueError, match="thought_tokens must be an int >= 0"):
        model.generate(ids, max_new_tokens=1, thought_tokens=-2)
    with pytest.raises(ValueError, match="QuietStarConfig: thought_temperature must be a finite number >= 0.*-1"):
        QuietStarConfig(thought_temperature=-1.0)


# ----------------------------------------------------------------------------- meta tokens
@pytest.mark.parametrize("start, end, field, token", [
    ("<eos>", "<|endofthought|>", "start_thought_token", "<eos>"),
    ("<|startofthought|>", "<pad>", "end_thought_token", "<pad>"),
    ("Ġof", "<|endofthought|>", "start_thought_token", "Ġof"),  # a plain BPE vocabulary token
])
def test_thought_tokens_already_in_the_vocabulary_are_refused(start, end, field, token):
    tokenizer = make_tokenizer()
    assert token in tokenizer.get_vocab()
    size = len(tokenizer)
    config = QuietStarConfig(start_thought_token=start, end_thought_token=end)
    with pytest.raises(ValueError, match=f"{field} '{token}' is already a token of the tokenizer.*"
                                         "choose another start_thought_token / end_thought_token"):
        QuietStarForCausalLM.from_base(make_lm(), tokenizer, config)
    assert len(tokenizer) == size  # nothing added


def test_eos_as_thought_token_is_named_as_the_eos():
    with pytest.raises(ValueError, match=r"'<eos>' is already a token of the tokenizer \(id \d+, its EOS token\)"):
        QuietStarForCausalLM.from_base(make_lm(), make_tokenizer(), QuietStarConfig(start_thought_token="<eos>"))


def test_meta_tokens_added_before_are_reused_but_a_pre_existing_special_token_is_not(tmp_path):
    model = make_model()
    again = QuietStarForCausalLM.from_base(make_lm(), model.tokenizer, model.config)  # rewrapped
    assert (again.start_id, again.end_id) == (model.start_id, model.end_id)
    model.save_pretrained(tmp_path / "m")
    loaded = QuietStarForCausalLM.from_pretrained(tmp_path / "m")
    assert (loaded.start_id, loaded.end_id) == (model.start_id, model.end_id)
    assert len(loaded.tokenizer) == len(model.tokenizer)
    # An added special token of the base tokenizer (not added by quietstar) is refused.
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|im_start|>"]})
    with pytest.raises(ValueError, match="start_thought_token '<\\|im_start\\|>' is already a token"):
        QuietStarForCausalLM.from_base(make_lm(), tokenizer, QuietStarConfig(start_thought_token="<|im_start|>"))


def test_a_saved_model_whose_tokenizer_has_the_string_as_a_plain_token_is_refused(tmp_path):
    """A saved folder is trusted only for an added special token of exactly the string."""
    model = make_model(start_thought_token="<|s|>", end_thought_token="<|e|>")
    model.save_pretrained(tmp_path / "m")
    config = QuietStarConfig.load(tmp_path / "m")
    config.start_thought_token = "Ġof"  # a vocabulary token of the saved tokenizer
    config.save(tmp_path / "m")
    with pytest.raises(ValueError, match="start_thought_token 'Ġof' is already a token"):
        QuietStarForCausalLM.from_pretrained(tmp_path / "m")


def test_training_from_a_saved_quietstar_model_keeps_its_meta_tokens(tiny_model_dir, tmp_path):
    result = train(TrainConfig.from_dict(tiny_settings(tiny_model_dir, tmp_path / "a", max_steps=1)))
    again = train(TrainConfig.from_dict(tiny_settings(result.checkpoint / "model", tmp_path / "b",
                                                      max_steps=1)))
    assert again.step == 1


# ----------------------------------------------------------------------------- resume checks
@pytest.fixture
def trained_run(tiny_model_dir, tmp_path):
    result = train(TrainConfig.from_dict(tiny_settings(tiny_model_dir, tmp_path / "run", max_steps=2,
                                                       checkpoint_every=1, keep_checkpoints=3)))
    assert result.step == 2
    return tmp_path / "run"


def test_max_steps_below_the_resumed_step_exits_2_before_any_work(trained_run, tiny_model_dir, capsys,
                                                                   monkeypatch):
    before = folder_snapshot(trained_run)
    built = []
    monkeypatch.setattr("quietstar.training.recipe.build_model", lambda *a: built.append(a))
    code, err = run_command(["--resume", str(trained_run), "--max-steps", "1"], capsys)
    assert code == 2 and not built and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("quietstar train: error: max_steps 1 is below "
                                                   "the step of the resumed checkpoint")
    assert "checkpoint-000002 (2)" in err and "--max-steps" in err
    assert folder_snapshot(trained_run) == before  # nothing written, not even train_config.yaml
    with pytest.raises(ValueError, match="max_steps 1 is below"):  # the train() API too
        train(TrainConfig.from_dict(tiny_settings(tiny_model_dir, trained_run, max_steps=1,
                                                  resume="latest")))
    assert folder_snapshot(trained_run) == before and not built


def test_resumed_checkpoint_without_its_train_config_exits_2_naming_the_file(trained_run, capsys):
    (trained_run / "checkpoint-000002" / "train_config.yaml").unlink()
    before = folder_snapshot(trained_run)
    code, err = run_command(["--resume", str(trained_run), "--max-steps", "3"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"quietstar train: error: {trained_run / 'checkpoint-000002' / 'train_config.yaml'} is missing" in err
    assert folder_snapshot(trained_run) == before
    assert [p.name for p in list_checkpoints(trained_run)] == ["checkpoint-000001", "checkpoint-000002"]
    # The checkpoint before it is complete and resumes.
    config = load_config(overrides={"resume": str(trained_run / "checkpoint-000001"), "max_steps": 2},
                         resumed_settings=resumed_settings)
    assert config.seq_len == 16 and config.quietstar.sampled_thought_tokens == 2


def test_load_config_reads_a_resumed_run_only_through_the_given_reader(tmp_path):
    """The settings module sits below the checkpoints: resuming, it is told how to read them."""
    with pytest.raises(ValueError, match="resuming needs resumed_settings=quietstar.training.checkpoint"):
        load_config(overrides={"resume": "latest", "output_dir": str(tmp_path)})
    seen = []

    def saved(resume, output_dir):
        seen.append((resume, output_dir))
        return {"seq_len": 24, "max_steps": 5, "output_dir": "elsewhere"}

    config = load_config(overrides={"resume": "latest", "output_dir": "run", "max_steps": 9},
                         resumed_settings=saved)
    assert seen == [("latest", "run")]
    assert (config.seq_len, config.max_steps, config.output_dir) == (24, 9, "run")  # given beats saved


def test_resuming_at_exactly_max_steps_is_fine(trained_run, capsys):
    assert command.main(["--resume", str(trained_run), "--max-steps", "2"]) == 0
    assert [p.name for p in list_checkpoints(trained_run)][-1] == "checkpoint-000002"
