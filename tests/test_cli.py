"""quietstar.cli: the main entry and the command modules: the command table, lazy imports, flags from dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from conftest import make_model
from quietstar.cli import main as cli
from quietstar.utils.settings import add_dataclass_arguments, field_docs, option, parse_dataclass
from quietstar.cli.analyze import AnalyzeArguments
from quietstar.cli.common import LoadingArguments, ModelArguments
from quietstar.cli.eval import EvalArguments
from quietstar.cli.generate import GenerateArguments
from quietstar.cli.inspect_thoughts import InspectArguments
from quietstar.training.distill_config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
NAMES = ["train", "generate", "eval", "analyze", "inspect", "distill"]
# command -> the dataclasses its flags come from
DATACLASSES = {"generate": [GenerateArguments, LoadingArguments],
               "eval": [ModelArguments, LoadingArguments, EvalArguments],
               "analyze": [ModelArguments, LoadingArguments, AnalyzeArguments],
               "inspect": [ModelArguments, LoadingArguments, InspectArguments],
               "distill": [DistillConfig]}


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------ the table
def test_help_lists_every_command_and_imports_none():
    done = python("import sys\n"
                  "from quietstar.cli import main as cli\n"
                  "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
                  "print(sorted(m for m in sys.modules if m in {c for c, _ in cli.COMMANDS.values()}))")
    assert done.returncode == 0, done.stderr
    help_out, imported = done.stdout.rsplit("\n", 2)[:2]
    for name, (_, help_line) in cli.COMMANDS.items():
        assert f"{name}  " in help_out and help_line in help_out
    assert list(cli.COMMANDS) == NAMES
    assert imported == "[]"


HEAVY = ("torch", "transformers", "accelerate", "numpy", "huggingface_hub", "matplotlib")


@pytest.mark.parametrize("command", ["", *NAMES])
def test_help_imports_no_heavy_package(command):
    # `python -m quietstar [COMMAND] --help` in a fresh interpreter: the flags come from
    # dataclasses, so listing them must not wait seconds for torch / transformers to import.
    done = python("import runpy, sys\n"
                  f"sys.argv = ['quietstar', *{[command] if command else []!r}, '--help']\n"
                  "try:\n    runpy.run_module('quietstar', run_name='__main__', alter_sys=True)\n"
                  "except SystemExit as e:\n    assert e.code == 0, e.code\n"
                  f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    assert done.returncode == 0, done.stderr
    assert "usage: quietstar" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["generate", "--model", "m", "--prompt", "p", "--top-k", "2"],
                                  ["inspect", "--model", "m"],
                                  ["analyze", "--model", "m", "--data", "d", "--out", "o", "--thought-fractions", "2"],
                                  ["train", "--max-steps", "many"],
                                  ["distill", "--teacher", "m", "--temperature", "-1"]])
def test_a_wrong_flag_is_refused_before_torch_is_imported(argv):
    # Checking the flags needs none of the run's packages: the one-line error comes at once.
    done = python("import sys\n"
                  "from quietstar.cli.main import main\n"
                  f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
                  f"print(code, sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "2 []"
    assert done.stderr.startswith(f"quietstar {argv[0]}: error: ")


def test_table_help_is_each_modules_help():
    for name, (module_name, help_line) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        assert module.HELP == help_line, name
        assert all(callable(getattr(module, f)) for f in ("add_arguments", "run", "main"))


def test_generate_imports_neither_training_nor_lm_eval(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "model")
    done = python("import sys\n"
                  "from quietstar.cli.main import main\n"
                  f"code = main(['generate', '--model', {str(tmp_path / 'model')!r}, '--prompt', 'Natalia sold',"
                  " '--max-new-tokens', '2', '--device', 'cpu'])\n"
                  "loaded = [m for m in ('quietstar.training.recipe', 'quietstar.cli.train', 'quietstar.training.checkpoint',"
                  " 'quietstar.evaluation.tasks', 'quietstar.evaluation.lm_eval_adapter', 'lm_eval') if m in sys.modules]\n"
                  "print(loaded)\n"
                  "sys.exit(code)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_a_command_module_that_fails_to_import_fails_loudly(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_command.py").write_text("import quietstar_no_such_package\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "broken", ("broken_command", "a command whose import fails"))
    monkeypatch.setitem(cli.COMMANDS, "missing", ("quietstar.cli.not_there", "a missing module"))
    assert "a command whose import fails" in help_text(capsys)  # listing imports nothing
    with pytest.raises(ModuleNotFoundError, match="quietstar_no_such_package"):
        cli.main(["broken"])
    with pytest.raises(ModuleNotFoundError, match="quietstar.cli.not_there"):
        cli.main(["missing", "--help"])
    assert cli.main(["generate", "--model", "m", "--prompt", "p", "--top-k", "2"]) == 2  # others work


def test_python_m_quietstar_runs_the_commands(tmp_path):
    for argv in (["-m", "quietstar", "generate", "--help"], ["-m", "quietstar", "inspect", "--help"]):
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        assert "--thought-tokens" in done.stdout


# ------------------------------------------------------------------ flags from dataclasses
@pytest.mark.parametrize("command", list(DATACLASSES))
def test_every_field_is_a_flag_with_its_docstring(command, capsys):
    text = "".join(help_text(capsys, command).split())  # the help wraps lines (and hyphenated words)
    for cls in DATACLASSES[command]:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text, (command, f.name)
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert "".join(docs[f.name].split()) in text, (command, f.name)


def test_help_shows_the_real_default_rules(capsys):
    for command in ("generate", "eval", "analyze", "inspect"):
        text = " ".join(help_text(capsys, command).split())
        assert "(default: the model's sampled_thought_tokens)" in text
        assert "(default: the model's thought_temperature)" in text
        assert "(default: None)" not in text, command
    text = " ".join(help_text(capsys, "generate").split())
    assert "(default: cuda when available, else cpu)" in text and "--greedy | --sample" in text
    text = " ".join(help_text(capsys, "eval").split())
    assert "--metrics METRICS comma-separated, from direct,accuracy,cot. direct: " in text
    assert "over --cot-samples answers (default: direct)" in text
    assert "--lm-eval TASK" in text and "--lm-eval-include DIR" in text
    assert "(default: embedded:smollm2-135m-instruct)" in text


def test_required_fields_are_required_flags(capsys):
    for argv, missing in [(["generate", "--prompt", "p"], "--model"), (["generate", "--model", "m"], "--prompt"),
                          (["analyze", "--out", "o"], "--data")]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert f"the following arguments are required: {missing}" in capsys.readouterr().err


def test_model_arguments_refuse_negative_thought_settings():
    assert ModelArguments().thought_tokens is None and ModelArguments().seed == 0
    with pytest.raises(ValueError, match="thought_tokens must be an int >= 0 .*-2"):
        ModelArguments(thought_tokens=-2)
    with pytest.raises(ValueError, match="thought_temperature must be a finite number >= 0"):
        ModelArguments(thought_temperature=float("nan"))


def test_option_lists_and_excluded_fields():
    @dataclasses.dataclass
    class Settings:
        names: tuple[str, ...] = ("a", "b")
        """some names"""
        extra: tuple[str, ...] | None = option(None, metavar="NAME", shown_default="no extra names")
        """more names"""
        mode: Literal["x", "y"] = "x"
        """a mode"""
        hidden: int = 3
        """added by hand"""

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Settings, exclude=("hidden",))
    help_out = " ".join(parser.format_help().split())
    assert "some names (default: a,b)" in help_out and "--extra NAME more names (default: no extra names)" in help_out
    assert "--hidden" not in help_out
    settings = parse_dataclass(Settings, parser.parse_args(["--names", " c, d ,,", "--extra", "none"]))
    assert settings == Settings(names=("c", "d"), extra=None)
    assert parse_dataclass(Settings, parser.parse_args(["--extra", "e"])).extra == ("e",)
    assert json.dumps(dataclasses.asdict(parse_dataclass(Settings, parser.parse_args([])))) == (
        '{"names": ["a", "b"], "extra": null, "mode": "x", "hidden": 3}')


GSM8K_FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_tiny.jsonl"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--data", "{gsm8k}", "--out", "{file}/x.json"], "--out {file}/x.json lies inside {file}, which is a file"),
    (["eval", "--data", "{gsm8k}", "--out", "{dir}"], "--out {dir} is a folder; give a file name"),
    (["analyze", "--data", "{gsm8k}", "--out", "{file}"], "--out {file} is a file; give a folder"),
    (["analyze", "--data", "{gsm8k}", "--out", "{file}/sub"], "lies inside {file}, which is a file"),
    (["inspect", "--text", "hi there", "--out", "{file}/page.html"], "lies inside {file}, which is a file"),
    (["inspect", "--text-file", "{dir}"], "--text-file {dir} is a folder"),
    (["inspect", "--text-file", "{dir}/missing.txt"], "--text-file {dir}/missing.txt does not exist"),
    (["inspect", "--text-file", "{binary}"], "is not UTF-8 text"),
])
def test_bad_paths_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, message):
    """Output paths and input files are checked before any work: exit 2, one line naming the
    problem, no traceback, the model never loaded, nothing written."""
    import quietstar.cli.common as common

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad path was refused")

    monkeypatch.setattr(common, "load_quietstar_model", no_load)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "bytes.txt").write_bytes(b"\xff\xfe not utf-8")
    names = {"file": str(tmp_path / "a-file"), "dir": str(tmp_path), "gsm8k": str(GSM8K_FIXTURE),
             "binary": str(tmp_path / "bytes.txt")}
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main([a.format(**names) for a in argv] + ["--model", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quietstar {argv[0]}: error: ") and message.format(**names) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_empty_prompt_is_refused(tmp_path, monkeypatch, capsys):
    import quietstar.cli.common as common

    monkeypatch.setattr(common, "load_quietstar_model", lambda name, device, *args, **kwargs: make_model())
    assert cli.main(["generate", "--model", "m", "--prompt", ""]) == 2
    assert capsys.readouterr().err.strip() == (
        "quietstar generate: error: --prompt is empty; give a text to continue")


def test_eval_help_and_readme_say_what_the_direct_metric_measures(capsys):
    # "direct" is not argmax accuracy: a user reading 0.03 must know it is the paper's
    # teacher-forced expected accuracy (tests/test_evaluation.py computes it by hand).
    help_out = "".join(help_text(capsys, "eval").split())  # the help wraps lines (and hyphenated words)
    readme = "".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for text in (help_out, readme):
        for phrase in ("teacher-forced expected accuracy", "not argmax accuracy",
                       "softmax restricted to the answer vocabulary", "mean over items"):
            assert "".join(phrase.split()) in text, phrase
