"""The README's commands run as written, in a fresh folder, with its placeholders filled in (a tiny
model for the embedded default and for DIR, small local files for the data, a local lm-eval task
for TASK). Where the command as written trains for minutes, the test adds the smallest overrides
that keep it what it is (the flags it adds are listed next to it); the multi-GPU launch is not
run here (tests/test_distributed.py runs the recipe sharded)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from quietstar.cli.main import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

TRAIN_DEMO = "quietstar train --max-steps 200 --seq-len 64 --learning-rate 3e-5"
TRAIN_YAML = "quietstar train --config examples/train.yaml --resume latest"
LAUNCH = "accelerate launch --config_file examples/fsdp.yaml -m quietstar train"
GENERATE = 'quietstar generate --model runs/<run>/checkpoint-<step>/model --prompt "Q: 3 + 4 =" --show-thoughts'
EVAL = "quietstar eval --model DIR --task gsm8k --data gsm8k_test.jsonl --metrics direct,accuracy,cot --limit 50"
LM_EVAL = "quietstar eval --model DIR --lm-eval TASK"
ANALYZE = "quietstar analyze --model DIR --data held_out.jsonl --out analysis/"
ANALYZE_MORE = "quietstar analyze ... --thought-fractions 1,0.25"
GENERATE_MORE = "quietstar generate ... --thought-threshold 2.5"
INSPECT = 'quietstar inspect --model DIR --text "..." --out thoughts.html'
# What the test adds to a command that would take minutes on a CPU as written: the run is the
# same, only shorter (one step, smaller batches), and its model the tiny one.
SHORTER = {TRAIN_DEMO: ["--max-steps", "1"],
           TRAIN_YAML: ["--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4",
                        "--seq-len", "24", "--eval-batches", "1"]}

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def readme_commands() -> list[str]:
    """The command lines of the README's Commands section, without their comments."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def test_every_readme_command_is_one_this_test_runs():
    assert readme_commands() == [TRAIN_DEMO, TRAIN_YAML, LAUNCH, GENERATE, EVAL, LM_EVAL, ANALYZE,
                                 ANALYZE_MORE, GENERATE_MORE, INSPECT]


def test_the_readme_commands_run_in_a_fresh_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("quietstar.training.recipe.plot_training_curves", lambda *args: None)
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copy(FIXTURES / "gsm8k_tiny.jsonl", tmp_path / "gsm8k_test.jsonl")
    (tmp_path / "held_out.jsonl").write_text("".join(
        json.dumps({"text": f"Natalia sold {n} clips in April and half as many, {n // 2}, in May."}) + "\n"
        for n in range(40, 52)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(MC_TASK.format(data=FIXTURES / "lm_eval_tiny.jsonl"))
    model = ["--model", str(tiny_model_dir)]  # for the embedded default
    last: dict[str, list[str]] = {}  # a command's arguments, for a later "quietstar CMD ..."

    def run(line: str, extra: list[str] = ()) -> str:
        argv = shlex.split(line)[1:]
        if argv[1:2] == ["..."]:
            argv = [argv[0], *last[argv[0]], *argv[2:]]
        else:
            last[argv[0]] = argv[1:]
        argv = [trained if a in ("DIR", "runs/<run>/checkpoint-<step>/model") else a for a in argv]
        assert main([*argv, *extra]) == 0, (line, capsys.readouterr().err[-2000:])
        return capsys.readouterr().err

    run(TRAIN_DEMO, model + SHORTER[TRAIN_DEMO])
    trained = str(next(tmp_path.glob("runs/quietstar-*/checkpoint-*/model")))
    err = run(TRAIN_YAML, model + SHORTER[TRAIN_YAML])  # the first time: there is no checkpoint yet
    assert "runs/smollm2-arithmetic holds no checkpoint yet, so this is a new run" in err
    err = run(TRAIN_YAML, model + ["--max-steps", "2"] + SHORTER[TRAIN_YAML][2:])
    assert "Training 1 steps (from step 1)" in err  # the second time: it continues
    run(GENERATE)
    run(GENERATE_MORE)
    run(EVAL, ["--cot-max-tokens", "16"])  # the tiny model has 256 positions (the embedded one 8192)
    run(LM_EVAL.replace("TASK", "tiny_mc"), ["--lm-eval-include", str(tmp_path / "tasks")])
    run(ANALYZE)
    run(ANALYZE_MORE)
    run(INSPECT)
    assert (tmp_path / "thoughts.html").is_file() and (tmp_path / "analysis" / "report.json").is_file()
