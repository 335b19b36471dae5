"""Which settings a run uses and where each came from: the presets, a --config file layered on its
base, a resumed run's saved settings and what it may change, the table every run starts with,
--help's defaults, ``--resume latest`` on a first run, a checkpoint's hand-edited
train_config.yaml, and what the examples say about their settings (tiny models, in-process)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from conftest import load_script

from quietstar.cli import train as command
from quietstar.cli.main import build_parser
from quietstar.training import checkpoint
from quietstar.training.checkpoint import list_checkpoints, resumed_settings
from quietstar.training.config import (
    DEFAULT_PRESET,
    RESUME_FIXED,
    TrainConfig,
    differences,
    load_config,
    resolve_config,
    setting,
)
from quietstar.training.recipe import train
from quietstar.utils.errors import QuietStarInputError

REPO = Path(__file__).resolve().parents[1]
# What the cpu-demo preset changes from the paper's defaults (its file, the README and the
# examples say so in words; the test below holds them to it).
CPU_DEMO = {"mixing_head_lr_multiplier": (30.0, 1.0), "quietstar.sampled_thought_tokens": (4, 9),
            "quietstar.policy_loss_weight": (1.0, 1e6), "quietstar.base_loss_weight": (1.0, 0.5),
            "quietstar.mixed_loss_weight": (1.0, 0.5)}


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("quietstar.training.recipe.plot_training_curves", lambda *args: None)


def tiny_flags(model_dir, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--output-dir", str(out), "--seq-len", "16", "--batch-size", "2",
            "--num-documents", "40", "--learning-rate", "1e-3", "--warmup-steps", "0",
            "--eval-every", "0", "--sample-every", "0", "--sampled-thought-tokens", "2",
            "--ahead-tokens", "2", *extra]


def run_command(argv, capsys) -> tuple[int, str]:
    code = command.main(argv)
    return code, capsys.readouterr().err


def one_line(text: str) -> str:
    return " ".join(text.split())


def folder_snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- layers
def test_a_small_config_file_layers_on_the_cpu_demo_preset_unless_it_names_a_base(tmp_path):
    """A small file used to replace the preset and train with the paper's settings (policy
    weight 1e6, head at 1x) without a word; it now changes only what it names."""
    assert {n: pair for n, pair in differences(load_config(DEFAULT_PRESET), TrainConfig()).items()} == CPU_DEMO
    assert load_config() == load_config(DEFAULT_PRESET)  # no --config: the preset
    assert load_config("defaults") == TrainConfig()  # the defaults preset: the dataclass defaults
    small = tmp_path / "small.yaml"
    small.write_text("seq_len: 24\n")
    assert load_config(small) == dataclasses.replace(load_config(DEFAULT_PRESET), seq_len=24)
    small.write_text("base: defaults\nseq_len: 24\n")
    assert load_config(small) == TrainConfig(seq_len=24)
    small.write_text("base: cpu-demo\nseq_len: 24\nquietstar:\n  ahead_tokens: 3\n")
    config = load_config(small, {"quietstar": {"policy_loss_weight": 5.0}})
    assert (config.seq_len, config.quietstar.ahead_tokens, config.quietstar.policy_loss_weight,
            config.quietstar.sampled_thought_tokens, config.mixing_head_lr_multiplier) == (24, 3, 5.0, 4, 30.0)


@pytest.mark.parametrize("base", ["papr", "3", "null", "[paper]", "''", "examples/train.yaml"])
def test_a_base_that_is_not_a_preset_exits_2_naming_the_presets(tmp_path, capsys, base):
    (tmp_path / "run.yaml").write_text(f"base: {base}\nseq_len: 24\n")
    with pytest.raises(QuietStarInputError, match="base: .* is not a preset.*one of cpu-demo, defaults, paper, rlp, rpt"):
        load_config(tmp_path / "run.yaml")
    code, err = run_command(["--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("quietstar train: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_origin_names_the_layer_of_every_setting(tmp_path):
    (tmp_path / "run.yaml").write_text("seq_len: 24\nquietstar:\n  ahead_tokens: 3\n")
    config, origin = resolve_config(tmp_path / "run.yaml", {"max_steps": 3}, overrides_label="flags")
    assert origin.layers == ["the cpu-demo preset", f"file {tmp_path / 'run.yaml'}", "flags"]
    assert origin.by_setting["seq_len"] == origin.by_setting["quietstar.ahead_tokens"] == f"file {tmp_path / 'run.yaml'}"
    assert origin.by_setting["max_steps"] == "flags"
    assert origin.by_setting["quietstar.policy_loss_weight"] == "the cpu-demo preset"
    assert any("layers on the cpu-demo preset" in r and "'base: defaults'" in r for r in origin.remarks)
    _, origin = resolve_config("defaults")
    assert origin.layers == ["the defaults preset"] and origin.by_setting == {}


@pytest.mark.parametrize("value, message", [
    ("", "--config is empty; give a YAML file or a preset (cpu-demo, defaults, paper, rlp, rpt)"),
    ("FOLDER", "is a folder; give a YAML file"),
    ("missing.yaml", "missing.yaml not found"),
    ("no-such-preset", "neither a YAML file nor a preset; presets: cpu-demo, defaults, paper, rlp, rpt"),
])
def test_a_bad_config_value_exits_2_in_one_line(tmp_path, capsys, value, message):
    value = str(tmp_path) if value == "FOLDER" else value
    code, err = run_command(["--config", value, "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("quietstar train: error: ") and message in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the table
def test_every_run_starts_by_logging_the_settings_that_differ_and_where_each_came_from(
        tiny_model_dir, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("min_lr_ratio: 0.2\nwarmup_steps: 1\nquietstar:\n  thoughts_per_position: 3\n")
    code, err = run_command(["--config", str(tmp_path / "run.yaml"),
                             *tiny_flags(tiny_model_dir, tmp_path / "run", "--max-steps", "1")], capsys)
    assert code == 0
    log = (tmp_path / "run" / "train.log").read_text()
    for text in (err, log):
        assert f"Settings: the cpu-demo preset < file {tmp_path / 'run.yaml'} < flags" in text
        assert "layers on the cpu-demo preset; to start from the dataclass defaults (the paper's method) instead, put 'base: defaults'" in text
        rows = {tuple(line.split()[:3]) + (" ".join(line.split()[3:]),) for line in text.splitlines()
                if line.startswith("  ") and len(line.split()) >= 4}
        assert ("quietstar.policy_loss_weight", "1.0", "1000000.0", "the cpu-demo preset") in rows
        assert ("mixing_head_lr_multiplier", "30.0", "1.0", "the cpu-demo preset") in rows
        assert ("min_lr_ratio", "0.2", "0.1", f"file {tmp_path / 'run.yaml'}") in rows
        assert ("warmup_steps", "0", "2", "flags") in rows  # the flag over the file
        assert ("quietstar.thoughts_per_position", "3", "2", f"file {tmp_path / 'run.yaml'}") in rows
        assert ("max_steps", "1", "20", "flags") in rows
        assert not any(row[0] == "quietstar.ahead_tokens" and row[1] == "4" for row in rows)  # the default
    assert log.index("Settings:") < log.index("Loading") < log.index("Training 1 steps")
    # The Python API logs them too, as given to train().
    config = TrainConfig.from_dict({**load_config("defaults", {"seq_len": 16}).to_dict(), "model": str(tiny_model_dir),
                                    "output_dir": str(tmp_path / "api"), "max_steps": 1, "batch_size": 2,
                                    "eval_every": 0, "sample_every": 0, "num_documents": 40,
                                    "quietstar": {"sampled_thought_tokens": 2, "ahead_tokens": 2}})
    log = (train(config).output_dir / "train.log").read_text()
    assert "Settings: given to train()" in log and re.search(r"seq_len +16 +32 +given to train\(\)", log)


# ----------------------------------------------------------------------------- --help
def test_help_shows_what_a_bare_run_uses_and_the_rule(capsys):
    """--help used to show the dataclass defaults (policy weight 1e6), not the preset a bare
    `quietstar train` runs with."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = one_line(capsys.readouterr().out)
    for name, (preset, paper) in CPU_DEMO.items():
        flag = "--" + name.split(".")[-1].replace("_", "-")
        shown = f"(default: {preset}, from the cpu-demo preset; {paper} with --config defaults)"
        assert re.search(re.escape(flag) + r" [A-Z_]+ [^()]*(\([^()]*\)[^()]*)*" + re.escape(shown), text), name
    assert "(default: 20)" in text and "(default: 3e-05)" in text  # unchanged by the preset: as before
    assert "A new run: the cpu-demo preset (the defaults shown below) < the --config file < the flags" in text
    assert "'base: defaults': the dataclass defaults" in text and "A resumed run: its own saved settings" in text
    assert "(default: None)" not in text.split("training:")[0]  # --config's default is said in words


# ----------------------------------------------------------------------------- resuming
@pytest.fixture
def paper_run(tiny_model_dir, tmp_path, capsys):
    """A one-step run from the defaults preset with a policy weight of 5 (neither preset's)."""
    code, _ = run_command(["--config", "defaults", *tiny_flags(tiny_model_dir, tmp_path / "run", "--max-steps", "1",
                                                            "--policy-loss-weight", "5")], capsys)
    assert code == 0
    return tmp_path / "run"


def test_a_resume_refused_by_its_checkpoint_leaves_the_run_settings_as_they_were(paper_run, capsys):
    """A damaged checkpoint refuses the resume (exit 2) after the settings were resolved: the run
    folder's train_config.yaml must still be the run's own, not the refused command's."""
    saved = (paper_run / "train_config.yaml").read_bytes()
    weights = next((paper_run / "checkpoint-000001" / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = run_command(["--resume", "latest", "--output-dir", str(paper_run), "--max-steps", "3",
                             "--learning-rate", "0.5"], capsys)
    assert code == 2 and "checkpoint-000001" in err
    assert (paper_run / "train_config.yaml").read_bytes() == saved


def test_resume_is_saved_settings_then_the_file_then_flags_and_no_base_again(paper_run, tiny_model_dir, capsys):
    (paper_run.parent / "more.yaml").write_text("max_steps: 2\nlearning_rate: 0.002\n")  # no base: cpu-demo
    flags = {"resume": "latest", "output_dir": str(paper_run), "max_steps": 3}
    config, origin = resolve_config(paper_run.parent / "more.yaml", flags, resumed_settings=resumed_settings,
                                    overrides_label="flags")
    assert config.quietstar.policy_loss_weight == 5.0  # the run's own, not the cpu-demo preset's 1.0
    assert config.mixing_head_lr_multiplier == 1.0 and config.quietstar.sampled_thought_tokens == 2
    assert (config.learning_rate, config.max_steps) == (0.002, 3)  # the file, then the flag
    assert origin.layers[0] == "the resumed run's saved settings"
    assert any("the cpu-demo preset is not applied again" in r for r in origin.remarks)
    code, err = run_command(["--config", str(paper_run.parent / "more.yaml"), "--resume", "latest",
                             "--output-dir", str(paper_run), "--max-steps", "2"], capsys)
    assert code == 0 and "Settings: the resumed run's saved settings < file" in err
    assert [p.name for p in list_checkpoints(paper_run)][-1] == "checkpoint-000002"


@pytest.mark.parametrize("change, name", [
    (["--seq-len", "24"], "seq_len"),  # refused before only after rewriting the run's train_config.yaml
    (["--seed", "3"], "seed"),
    (["--meta-token-lr-multiplier", "1"], "quietstar.meta_token_lr_multiplier"),  # was taken silently:
    (["--config", "FILE"], "quietstar.mixing_weight_bounded"),                     # START/END rescaled
])
def test_a_resume_that_changes_a_fixed_setting_exits_2_before_writing_anything(paper_run, capsys, change, name):
    (paper_run.parent / "change.yaml").write_text("quietstar:\n  mixing_weight_bounded: true\n")
    change = [str(paper_run.parent / "change.yaml") if c == "FILE" else c for c in change]
    before = folder_snapshot(paper_run)
    code, err = run_command(["--resume", "latest", "--output-dir", str(paper_run), "--max-steps", "2", *change],
                            capsys)
    assert code == 2 and "Traceback" not in err
    assert f"quietstar train: error: a resumed run cannot change {name} (the run's" in err
    assert ("from flags" if change[0] != "--config" else f"from file {change[1]}") in err
    assert "max_steps, learning_rate" in err and "start a new run" in err
    assert folder_snapshot(paper_run) == before


def test_every_fixed_setting_names_a_real_field_and_lora_ones_count_only_with_lora():
    for name in RESUME_FIXED:
        setting(TrainConfig(), name)
    for rank, refused in ((0, False), (4, True)):
        saved = {**TrainConfig().to_dict(), "lora_rank": rank}
        resolve = lambda: resolve_config("defaults", {"resume": "latest", "lora_alpha": 8.0},  # noqa: E731
                                         resumed_settings=lambda *a: saved)
        if refused:
            with pytest.raises(QuietStarInputError, match=r"cannot change lora_alpha \(the run's 16.0, 8.0 from overrides\)"):
                resolve()
        else:
            assert resolve()[0].lora_alpha == 8.0  # no adapter: nothing depends on it


def test_resume_latest_on_a_first_run_starts_it_and_the_same_command_continues_it(tiny_model_dir, tmp_path,
                                                                                   capsys):
    """The README's `--config ... --resume latest` failed on a first run (no checkpoint yet)."""
    command_line = ["--resume", "latest", *tiny_flags(tiny_model_dir, tmp_path / "new" / "run")]
    code, err = run_command([*command_line, "--max-steps", "1"], capsys)
    assert code == 0
    assert f"--resume latest: {tmp_path / 'new' / 'run'} holds no checkpoint yet, so this is a new run" in err
    assert "Settings: the cpu-demo preset < flags" in err
    code, err = run_command([*command_line, "--max-steps", "2"], capsys)
    assert code == 0 and "holds no checkpoint yet" not in err
    assert "Settings: the resumed run's saved settings < flags" in err and "Training 1 steps (from step 1)" in err
    code, err = run_command(["--resume", "latest", "--max-steps", "1"], capsys)
    assert code == 2 and "--resume latest needs --output-dir" in err


# ----------------------------------------------------------------------------- edited settings
def test_a_hand_edited_train_config_is_named_as_edited_with_how_to_change_settings(paper_run, capsys):
    """It was called damaged, with advice to delete the run's only checkpoint."""
    ckpt = checkpoint.latest_checkpoint(paper_run)
    saved = ckpt / "train_config.yaml"
    saved.write_text(saved.read_text().replace("max_steps: 1\n", "max_steps: 5\n"))
    before = folder_snapshot(paper_run)
    code, err = run_command(["--resume", "latest", "--output-dir", str(paper_run), "--max-steps", "2"], capsys)
    assert code == 2 and "Traceback" not in err and "delete" not in err and "damaged" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"quietstar train: error: {saved} was edited after the checkpoint was written "
                              "(changed: max_steps): it holds valid settings")
    assert f"cp {paper_run / 'train_config.yaml'} {saved} puts it back" in message
    assert f"quietstar train --resume {ckpt} --max-steps N ... (flags) or --config FILE" in message
    assert "every setting may change" in message and "seq_len" in message  # and which may not
    assert folder_snapshot(paper_run) == before
    with pytest.raises(checkpoint.CheckpointError, match="was edited after"):  # the Python API's path
        checkpoint.verify_checksums(ckpt)
    (paper_run / "train_config.yaml").unlink()  # no original left: undo by hand
    code, err = run_command(["--resume", str(ckpt), "--max-steps", "2"], capsys)
    assert code == 2 and "put back the values you changed" in err and "delete" not in err
    saved.write_text(saved.read_text().replace("max_steps: 5\n", "max_steps: 1\n"))  # the edit undone
    assert command.main(["--resume", str(ckpt), "--max-steps", "2"]) == 0


@pytest.mark.parametrize("edit, reason", [
    (lambda text: text + "max_steps: [\n", "is not valid YAML"),
    (lambda text: text.replace("max_steps: 1\n", "max_steps: -5\n"), "max_steps must be an int >= 1"),
    (lambda text: text.replace("seq_len: 16\n", "seq_len: 16\nsequence_length: 16\n"), "unknown training setting"),
])
def test_a_train_config_that_no_longer_holds_valid_settings_is_named_so(paper_run, capsys, edit, reason):
    saved = checkpoint.latest_checkpoint(paper_run) / "train_config.yaml"
    saved.write_text(edit(saved.read_text()))
    code, err = run_command(["--resume", "latest", "--output-dir", str(paper_run), "--max-steps", "2"], capsys)
    assert code == 2 and "Traceback" not in err and "delete" not in err
    assert f"{saved} has changed since it was written" in err and "no longer holds valid settings" in err
    assert reason in err and f"cp {paper_run / 'train_config.yaml'} {saved} puts it back" in err


def test_damage_advice_names_an_earlier_checkpoint_and_never_deletes_the_only_one(tiny_model_dir, tmp_path):
    result = train(TrainConfig.from_dict({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"), "seq_len": 16, "batch_size": 2,
        "max_steps": 2, "checkpoint_every": 1, "eval_every": 0, "sample_every": 0, "num_documents": 40,
        "quietstar": {"sampled_thought_tokens": 2, "ahead_tokens": 2}}))
    first, last = list_checkpoints(result.output_dir)
    for ckpt in (first, last):
        state = ckpt / "training_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=f"damaged; delete {re.escape(str(last))} .*to resume "
                                                         "from checkpoint-000001, an earlier checkpoint"):
        checkpoint.verify_checksums(last)
    with pytest.raises(checkpoint.CheckpointError, match="resume from another checkpoint of the run: --resume "
                                                         + re.escape(str(last))):
        checkpoint.verify_checksums(first)
    import shutil
    shutil.rmtree(last)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint-000001 is the run's only checkpoint, so "
                                                         "keep it") as error:
        checkpoint.verify_checksums(first)
    assert "delete" not in str(error.value)


# ----------------------------------------------------------------------------- the examples
def test_examples_train_yaml_is_the_cpu_demo_method_with_the_changes_it_names():
    """It gave policy weight 1e6 with a comment calling the preset's 100 (the preset has 1.0)."""
    text = (REPO / "examples" / "train.yaml").read_text()
    example, preset = load_config(REPO / "examples" / "train.yaml"), load_config(DEFAULT_PRESET)
    assert "base" not in yaml.safe_load(text)  # layered on the preset, as its header says
    assert example.quietstar == dataclasses.replace(preset.quietstar, sampled_thought_tokens=8)
    assert example.mixing_head_lr_multiplier == preset.mixing_head_lr_multiplier
    assert "with the method of the cpu-demo preset" in text
    assert "longer thoughts than its 4" in text and preset.quietstar.sampled_thought_tokens == 4
    # The preset's settings as the example, the preset's own file and the README put them in words.
    words = one_line(text.replace("#", ""))
    assert "policy weight 1, the mixing head at 30x the learning rate, base and mixed NLL weights 1" in words
    readme = one_line((REPO / "README.md").read_text())
    assert "k = 4, policy weight 1, head learning rate 30x, NLL weights 1" in readme
    assert CPU_DEMO == {n: pair for n, pair in differences(preset, TrainConfig()).items()}


def test_examples_trainer_takes_the_preset_settings(tmp_path):
    """It gave policy weight 100 and the head at 1x as "the cpu-demo preset's method"."""
    example = load_script("examples/trainer.py")
    preset = load_config(DEFAULT_PRESET)
    args = example.training_arguments(preset, str(tmp_path / "out"), 2)
    assert (args.mixing_head_lr_multiplier, args.learning_rate, args.warmup_steps, args.max_grad_norm,
            args.weight_decay) == (30.0, preset.learning_rate, preset.warmup_steps, preset.max_grad_norm,
                                   preset.weight_decay)
    assert args.lr_scheduler_kwargs == {"min_lr_rate": preset.min_lr_ratio}
    assert "The settings are those of the cpu-demo preset" in example.__doc__
