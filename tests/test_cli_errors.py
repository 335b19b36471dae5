"""The sweep of bad inputs against every command: each one ends as one line
``quietstar <command>: error: <problem and fix>`` on stderr, exit code 2, no traceback, and
nothing written (no output file, no run folder). The cases run in-process through
``quietstar.cli.main.main``, the one error boundary; an exception escaping it fails the test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import make_lm, make_model, make_tokenizer
from quietstar.cli import main as cli
from quietstar.utils.errors import MissingDependencyError, QuietStarInputError

FIXTURES = Path(__file__).parent / "fixtures"
G = str(FIXTURES / "gsm8k_tiny.jsonl")
QS = ["--model", "{qs}"]  # a saved QuietStar model: loading it prints no note
PLAIN = ["--model", "{plain}", "--max-steps", "1"]
QUIET = ["--eval-every", "0"]

# (command, case, argv, a fragment the one error line must hold)
CASES = [
    # ------------------------------------------------------------------ generate
    ("generate", "model-missing", ["--model", "./nope", "--prompt", "hi"], "Model './nope' not found"),
    ("generate", "model-file", ["--model", "a-file", "--prompt", "hi"], "is a file, not a model folder"),
    ("generate", "model-empty-dir", ["--model", "empty-dir", "--prompt", "hi"], "has no config.json"),
    ("generate", "model-garbage-config", ["--model", "garbage-model", "--prompt", "hi"],
     "config.json is not valid JSON"),
    ("generate", "model-corrupt-head", ["--model", "corrupt-head", "--prompt", "hi"],
     "quietstar_head.safetensors is corrupt"),
    ("generate", "model-no-weights", ["--model", "no-weights", "--prompt", "hi"], "no file named model.safetensors"),
    ("generate", "model-truncated-weights", ["--model", "truncated", "--prompt", "hi"],
     "truncated/model.safetensors is damaged"),
    ("generate", "model-bad-embedded", ["--model", "embedded:nope", "--prompt", "hi"], "Unknown embedded model"),
    ("generate", "model-hub-offline", ["--model", "nobody/no-such-model", "--prompt", "hi"],
     "could not be loaded in the local Hugging Face cache (offline mode)"),
    ("generate", "prompt-empty", QS + ["--prompt", ""], "--prompt is empty"),
    ("generate", "prompt-missing", QS, "the following arguments are required: --prompt"),
    ("generate", "max-new-tokens-0", QS + ["--prompt", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1, got 0"),
    ("generate", "max-new-tokens-negative", QS + ["--prompt", "hi", "--max-new-tokens", "-3"],
     "--max-new-tokens must be >= 1"),
    ("generate", "max-new-tokens-past-the-positions", QS + ["--prompt", "hi", "--max-new-tokens", "1000"],
     "generating 1000 tokens needs position ids up to 1004, but LlamaForCausalLM has 256 positions"),
    ("generate", "max-new-tokens-text", QS + ["--prompt", "hi", "--max-new-tokens", "x"],
     "argument --max-new-tokens: invalid int value: 'x' (see quietstar generate --help)"),
    ("generate", "temperature-0", QS + ["--prompt", "hi", "--sample", "--temperature", "0"],
     "temperature must be > 0"),
    ("generate", "temperature-negative", QS + ["--prompt", "hi", "--sample", "--temperature", "-1"],
     "temperature must be > 0"),
    ("generate", "top-k-0", QS + ["--prompt", "hi", "--sample", "--top-k", "0"], "top_k must be >= 1"),
    ("generate", "top-p-above-1", QS + ["--prompt", "hi", "--sample", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("generate", "top-p-0", QS + ["--prompt", "hi", "--sample", "--top-p", "0"], "top_p must be in (0, 1]"),
    ("generate", "top-k-without-sample", QS + ["--prompt", "hi", "--top-k", "3"], "need --sample"),
    ("generate", "thought-tokens-negative", QS + ["--prompt", "hi", "--thought-tokens", "-1"],
     "thought_tokens must be an int >= 0 (0 = no thought), got -1"),
    ("generate", "thought-temperature-nan", QS + ["--prompt", "hi", "--thought-temperature", "nan"],
     "thought_temperature must be a finite number"),
    ("generate", "color-unknown", QS + ["--prompt", "hi", "--color", "pink"], "argument --color: invalid choice"),
    ("generate", "device-unknown", QS + ["--prompt", "hi", "--device", "gpu0"], "--device: unknown device 'gpu0'"),
    ("generate", "dtype-unknown", QS + ["--prompt", "hi", "--dtype", "int8"], "--dtype: Unknown dtype 'int8'"),
    ("generate", "revision-of-a-folder", QS + ["--prompt", "hi", "--revision", "v1"], "a revision applies to Hub ids"),
    ("generate", "device-and-device-map", QS + ["--prompt", "hi", "--device", "cpu", "--device-map", "cpu"],
     "give --device or --device-map, not both"),
    ("generate", "unknown-flag", QS + ["--prompt", "hi", "--frobnicate"],
     "unrecognized arguments: --frobnicate (see quietstar generate --help)"),
    # ------------------------------------------------------------------ eval
    ("eval", "model-missing", ["--model", "./nope", "--data", G], "Model './nope' not found"),
    ("eval", "model-garbage-config", ["--model", "garbage-model", "--data", G], "config.json is not valid JSON"),
    ("eval", "data-missing", QS + ["--data", "nope.jsonl"], "data file 'nope.jsonl' does not exist"),
    ("eval", "data-folder", QS + ["--data", "empty-dir"], "--data empty-dir is a folder; give a JSONL file"),
    ("eval", "data-bad-json", QS + ["--data", "bad.jsonl"], "bad.jsonl:2 is not valid JSON"),
    ("eval", "data-not-utf8", QS + ["--data", "binary.jsonl"], "binary.jsonl:2 is not UTF-8 text"),
    ("eval", "data-plain-text", QS + ["--data", "binary.txt"], "binary.txt:1 is not valid JSON"),
    ("eval", "data-empty", QS + ["--data", "empty.jsonl"], "--data empty.jsonl holds no records"),
    ("eval", "data-wrong-fields", QS + ["--data", "fields.jsonl"], "fields.jsonl:1: GSM8K record 0 has no 'question'"),
    ("eval", "data-not-objects", QS + ["--data", "list.jsonl"], "list.jsonl:1 holds a JSON list, not a record"),
    ("eval", "data-of-another-task", QS + ["--task", "csqa", "--data", G], "CommonsenseQA record 0 lacks 'choices'"),
    ("eval", "task-unknown", QS + ["--task", "mmlu"], "argument --task: invalid choice: 'mmlu'"),
    ("eval", "metrics-unknown", QS + ["--data", G, "--metrics", "bleu"], "--metrics: unknown metric(s) ['bleu']"),
    ("eval", "metrics-empty", QS + ["--data", G, "--metrics", ""], "--metrics is empty"),
    ("eval", "limit-0", QS + ["--data", G, "--limit", "0"], "--limit must be >= 1, got 0"),
    ("eval", "limit-negative", QS + ["--data", G, "--limit", "-2"], "--limit must be >= 1"),
    ("eval", "batch-size-0", QS + ["--data", G, "--batch-size", "0"], "--batch-size must be >= 1"),
    ("eval", "cot-samples-0", QS + ["--data", G, "--metrics", "cot", "--cot-samples", "0"],
     "--cot-samples must be >= 1"),
    ("eval", "cot-max-tokens-0", QS + ["--data", G, "--metrics", "cot", "--cot-max-tokens", "0"],
     "--cot-max-tokens must be >= 1"),
    ("eval", "lm-eval-include-alone", QS + ["--data", G, "--lm-eval-include", "empty-dir"], "it needs --lm-eval TASK"),
    ("eval", "out-inside-a-file", QS + ["--data", G, "--out", "a-file/x.json"],
     "--out a-file/x.json lies inside a-file, which is a file"),
    ("eval", "out-is-a-folder", QS + ["--data", G, "--out", "empty-dir"], "--out empty-dir is a folder"),
    ("eval", "out-unwritable", QS + ["--data", G, "--out", "{unwritable}/x.json"], "cannot create files in"),
    ("eval", "dtype-unknown", QS + ["--data", G, "--dtype", "int8"], "--dtype: Unknown dtype"),
    ("eval", "device-unknown", QS + ["--data", G, "--device", "gpu0"], "--device: unknown device"),
    # ------------------------------------------------------------------ analyze
    ("analyze", "model-missing", ["--model", "./nope", "--data", G, "--out", "o"], "Model './nope' not found"),
    ("analyze", "model-no-weights", ["--model", "no-weights", "--data", G, "--out", "o"],
     "no file named model.safetensors"),
    ("analyze", "data-missing", QS + ["--data", "nope.jsonl", "--out", "o"], "data path 'nope.jsonl' does not exist"),
    ("analyze", "data-folder-without-data", QS + ["--data", "nodata", "--out", "o"],
     "data directory 'nodata' has no .txt/.jsonl/.json/.parquet files"),
    ("analyze", "data-bad-json", QS + ["--data", "bad.jsonl", "--out", "o"], "bad.jsonl:2 is not valid JSON"),
    ("analyze", "data-not-utf8-jsonl", QS + ["--data", "binary.jsonl", "--out", "o"], "binary.jsonl:2 is not UTF-8"),
    ("analyze", "data-not-utf8-txt", QS + ["--data", "binary.txt", "--out", "o"], "binary.txt:3 is not UTF-8"),
    ("analyze", "data-empty", QS + ["--data", "empty.jsonl", "--out", "o"], "--data empty.jsonl holds no documents"),
    ("analyze", "data-wrong-fields", QS + ["--data", "fields.jsonl", "--out", "o"],
     "fields.jsonl:1: record has no 'text' field"),
    ("analyze", "data-not-objects", QS + ["--data", "list.jsonl", "--out", "o"],
     "list.jsonl:1: a record must be a JSON object"),
    ("analyze", "data-text-a-list", QS + ["--data", "list-text.jsonl", "--out", "o"],
     "list-text.jsonl:2: field 'text' holds a list"),
    ("analyze", "data-csv", QS + ["--data", "data.csv", "--out", "o"], "unsupported file type data.csv"),
    ("analyze", "data-builtin-unknown", QS + ["--data", "builtin:nope", "--out", "o"], "unknown built-in corpus"),
    ("analyze", "data-hub-offline", QS + ["--data", "nobody/no-such-dataset", "--out", "o"],
     "dataset 'nobody/no-such-dataset' could not be found"),
    ("analyze", "limit-0", QS + ["--data", G, "--out", "o", "--limit", "0"], "--limit must be >= 1"),
    ("analyze", "max-length-1", QS + ["--data", G, "--out", "o", "--max-length", "1"], "--max-length must be >= 2"),
    ("analyze", "batch-size-0", QS + ["--data", G, "--out", "o", "--batch-size", "0"], "--batch-size must be >= 1"),
    ("analyze", "buckets-0", QS + ["--data", G, "--out", "o", "--buckets", "0"], "--buckets must be >= 1"),
    ("analyze", "thought-tokens-0", QS + ["--data", G, "--out", "o", "--thought-tokens", "0"],
     "--thought-tokens must be >= 1"),
    ("analyze", "thought-source-unknown", QS + ["--data", G, "--out", "o", "--thought-source", "none"],
     "argument --thought-source: invalid choice"),
    ("analyze", "out-is-a-file", QS + ["--data", G, "--out", "a-file"], "--out a-file is a file; give a folder"),
    ("analyze", "out-inside-a-file", QS + ["--data", G, "--out", "a-file/sub"], "lies inside a-file, which is a file"),
    ("analyze", "out-unwritable", QS + ["--data", G, "--out", "{unwritable}/o"], "cannot create files in"),
    ("analyze", "out-missing", QS + ["--data", G], "the following arguments are required: --out"),
    # ------------------------------------------------------------------ inspect
    ("inspect", "model-missing", ["--model", "./nope", "--text", "hi there"], "Model './nope' not found"),
    ("inspect", "model-corrupt-head", ["--model", "corrupt-head", "--text", "hi there"], "is corrupt"),
    ("inspect", "text-empty", QS + ["--text", ""], "the text has 0 tokens"),
    ("inspect", "text-file-empty", QS + ["--text-file", "empty.txt"], "the text has 0 tokens"),
    ("inspect", "text-file-missing", QS + ["--text-file", "nope.txt"], "--text-file nope.txt does not exist"),
    ("inspect", "text-file-folder", QS + ["--text-file", "empty-dir"], "--text-file empty-dir is a folder"),
    ("inspect", "text-file-not-utf8", QS + ["--text-file", "binary.txt"], "--text-file binary.txt is not UTF-8 text"),
    ("inspect", "text-missing", QS, "give the text to inspect: --text TEXT or --text-file FILE"),
    ("inspect", "text-twice", QS + ["--text", "a", "--text-file", "empty.txt"], "give --text or --text-file, not both"),
    ("inspect", "out-is-a-folder", QS + ["--text", "hi there", "--out", "empty-dir"], "--out empty-dir is a folder"),
    ("inspect", "out-inside-a-file", QS + ["--text", "hi there", "--out", "a-file/p.html"], "lies inside a-file"),
    ("inspect", "out-unwritable", QS + ["--text", "hi there", "--out", "{unwritable}/p.html"], "cannot create files in"),
    ("inspect", "thought-tokens-text", QS + ["--text", "hi there", "--thought-tokens", "two"],
     "argument --thought-tokens: invalid int value: 'two'"),
    ("inspect", "dtype-unknown", QS + ["--text", "hi there", "--dtype", "int8"], "--dtype: Unknown dtype"),
    # ------------------------------------------------------------------ train
    ("train", "model-missing", ["--model", "./nope", "--max-steps", "1"], "Model './nope' not found"),
    ("train", "model-garbage-config", ["--model", "garbage-model", "--max-steps", "1"], "config.json is not valid JSON"),
    ("train", "data-missing", PLAIN + ["--data", "nope.jsonl"], "data path 'nope.jsonl' does not exist"),
    ("train", "data-bad-json", PLAIN + QUIET + ["--data", "bad.jsonl"], "bad.jsonl:2 is not valid JSON"),
    ("train", "data-not-utf8", PLAIN + QUIET + ["--data", "binary.jsonl"], "binary.jsonl:2 is not UTF-8 text"),
    ("train", "data-empty", PLAIN + QUIET + ["--data", "empty.jsonl"],
     "training data 'empty.jsonl' has no documents: it holds no text"),
    ("train", "data-wrong-fields", PLAIN + QUIET + ["--data", "fields.jsonl"], "fields.jsonl:1: record has no 'text'"),
    ("train", "data-not-objects", PLAIN + QUIET + ["--data", "list.jsonl"], "list.jsonl:1: a record must be a JSON object"),
    ("train", "data-text-a-list", PLAIN + QUIET + ["--data", "list-text.jsonl"], "list-text.jsonl:2: field 'text' holds"),
    ("train", "eval-documents-above-the-corpus", PLAIN + ["--data", "dups.txt", "--eval-documents", "10"],
     "has only 6 documents, all taken for evaluation (--eval-documents 10); leave --eval-documents unset"),
    ("train", "seq-len-past-the-positions", PLAIN + ["--seq-len", "250"],
     "training on seq_len 250 with k=4, A=4 needs position ids up to 258, but LlamaForCausalLM has 256 positions"),
    ("train", "data-only-held-out-duplicates",
     PLAIN + ["--data", "dups.txt", "--eval-documents", "1", "--eval-batches", "1", "--seq-len", "8"],
     "each of its 5 documents after the 1 held out for evaluation repeats a held-out one"),
    ("train", "max-steps-0", PLAIN[:2] + ["--max-steps", "0"], "max_steps must be an int >= 1, got 0"),
    ("train", "max-steps-text", ["--max-steps", "x"], "argument --max-steps: invalid int value: 'x'"),
    ("train", "learning-rate-negative", PLAIN + ["--learning-rate", "-1"], "learning_rate must be finite and > 0"),
    ("train", "precision-unknown", ["--precision", "int8"], "argument --precision: invalid choice: 'int8'"),
    ("train", "config-missing", ["--config", "nope.yaml"], "config file nope.yaml not found"),
    ("train", "config-bad-yaml", ["--config", "bad.yaml"], "config file bad.yaml is not valid YAML: expected the node"),
    ("train", "config-not-utf8", ["--config", "binary.txt"], "config file binary.txt is not UTF-8 text"),
    ("train", "config-key-twice", PLAIN[:2] + ["--config", "twice.yaml"], "config file twice.yaml gives 'seq_len' twice, at lines 1 and 3"),
    ("train", "output-dir-inside-a-file", PLAIN + ["--output-dir", "a-file/run"], "lies inside a-file, which is a file"),
    ("train", "output-dir-is-a-file", PLAIN + ["--output-dir", "a-file"], "--output-dir a-file is a file"),
    ("train", "output-dir-unwritable", PLAIN + ["--output-dir", "{unwritable}/run"], "cannot create files in"),
    ("train", "resume-without-a-run", PLAIN[:2] + ["--resume", "empty-dir"],  # (latest there: a new run)
     "--resume empty-dir: not a checkpoint folder or a run folder holding checkpoint-* folders"),
    ("train", "unknown-flag", ["--frobnicate"], "unrecognized arguments: --frobnicate (see quietstar train --help)"),
    # ------------------------------------------------------------------ distill
    ("distill", "teacher-plain", ["--teacher", "{plain}", "--output-dir", "out"],
     "is a plain model, not a QuietStar model (quietstar_config.json is missing)"),
    ("distill", "teacher-not-a-model", ["--teacher", "empty-dir", "--output-dir", "out"],
     "--teacher empty-dir is not a model folder (no config.json)"),
    ("distill", "teacher-a-file", ["--teacher", "a-file", "--output-dir", "out"], "--teacher a-file is a file"),
    ("distill", "output-dir-inside-the-teacher", ["--teacher", "{qs}", "--output-dir", "{qs}/run"],
     "lies inside the teacher"),
    ("distill", "temperature-zero", ["--teacher", "{qs}", "--temperature", "0"], "temperature must be > 0"),
    ("distill", "thought-fraction-above-1", ["--teacher", "{qs}", "--thought-fraction", "1.5"],
     "thought_fraction must be in (0, 1]"),
    ("distill", "data-missing", ["--teacher", "{qs}", "--output-dir", "out", "--data", "nope.jsonl"],
     "data path 'nope.jsonl' does not exist"),
    ("distill", "teacher-missing", ["--output-dir", "out"], "the following arguments are required: --teacher"),
    ("distill", "curriculum-zero", ["--teacher", "{qs}", "--curriculum", "4,0"],
     "curriculum must list thought lengths >= 1, got [4, 0]"),
    ("distill", "curriculum-not-numbers", ["--teacher", "{qs}", "--curriculum", "4,x"], "--curriculum"),
    ("distill", "cache-top-k-zero", ["--teacher", "{qs}", "--cache-top-k", "0"], "cache_top_k must be >= 1"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of bad inputs (and two good models), the placeholders of CASES."""
    root = tmp_path_factory.mktemp("bad-inputs")
    make_model().save_pretrained(root / "qs-model")
    make_lm().save_pretrained(root / "plain-model")
    make_tokenizer().save_pretrained(root / "plain-model")
    (root / "a-file").write_text("x")
    (root / "empty-dir").mkdir()
    (root / "garbage-model").mkdir()
    (root / "garbage-model" / "config.json").write_text("{not json")
    shutil.copytree(root / "qs-model", root / "corrupt-head")
    (root / "corrupt-head" / "quietstar_head.safetensors").write_bytes(b"garbage")
    shutil.copytree(root / "qs-model", root / "no-weights")
    for weights in (root / "no-weights").glob("model*.safetensors"):
        weights.unlink()
    (root / "bad.jsonl").write_text('{"text": "a fine line of text here"}\n{not json\n')
    (root / "binary.jsonl").write_bytes(b'{"text": "ok line"}\n{"text": "\xff\xfe"}\n')
    (root / "binary.txt").write_bytes(b"fine\n\nnot \xff utf-8\n")
    (root / "empty.jsonl").write_text("")
    (root / "empty.txt").write_text("")
    (root / "fields.jsonl").write_text('{"foo": 1}\n')
    (root / "list.jsonl").write_text("[1, 2]\n")
    (root / "data.csv").write_text("a,b\n")
    (root / "nodata").mkdir()
    (root / "nodata" / "x.csv").write_text("a")
    (root / "dups.txt").write_text("same words again and again here\n\n" * 6)
    (root / "bad.yaml").write_text("a: [1,\n")
    (root / "twice.yaml").write_text("seq_len: 16\nmax_steps: 1\nseq_len: 32\n")
    (root / "list-text.jsonl").write_text('{"text": "fine words"}\n{"text": ["a", "list"]}\n')
    shutil.copytree(root / "qs-model", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    if os.geteuid() == 0:  # root writes into any folder: a pseudo file system refuses new files
        unwritable = "/proc/quietstar-test"
    else:
        (root / "read-only").mkdir()
        os.chmod(root / "read-only", 0o555)
        unwritable = str(root / "read-only" / "sub")
    return root, {"qs": str(root / "qs-model"), "plain": str(root / "plain-model"), "unwritable": unwritable}


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command, case, argv, message", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(inputs, monkeypatch, capsys, command, case, argv, message):
    import datasets

    root, names = inputs
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    before = tree(root)
    argv = [a.format(**names) for a in argv]
    try:
        code = cli.main([command, *argv])
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert errors[0].startswith(f"quietstar {command}: error: ")
    assert message in errors[0], errors[0]
    assert tree(root) == before  # nothing written, no run folder left behind


def test_every_command_is_swept():
    assert {command for command, *_ in CASES} == set(cli.COMMANDS)


def test_output_paths_are_checked_before_the_model_loads(inputs, monkeypatch, capsys):
    """The check comes from the dataclass field (option(output=...)), for every command."""
    import quietstar.cli.common as common

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad output path was refused")

    root, names = inputs
    monkeypatch.chdir(root)
    monkeypatch.setattr(common, "load_quietstar_model", no_load)
    for argv in (["eval", "--data", G, "--out", "a-file/x.json"], ["analyze", "--data", G, "--out", "a-file"],
                 ["inspect", "--text", "hi there", "--out", "empty-dir"]):
        assert cli.main([*argv, "--model", names["qs"]]) == 2
        assert "--out" in capsys.readouterr().err


def test_generate_checks_the_prompt_and_the_length_before_the_model_loads(inputs, monkeypatch, capsys):
    import quietstar.cli.common as common

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    root, names = inputs
    monkeypatch.setattr(common, "load_quietstar_model", no_load)
    for argv, message in ((["--prompt", ""], "--prompt is empty"),
                          (["--prompt", "hi", "--max-new-tokens", "300"], "generating 300 tokens needs position ids")):
        assert cli.main(["generate", "--model", names["qs"], *argv]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("bug", [KeyError("a bug"), ValueError("a bug"), ImportError("a bug"),
                                 RuntimeError("a bug")], ids=lambda e: type(e).__name__)
def test_an_error_that_is_not_bad_input_keeps_its_traceback(tmp_path, monkeypatch, bug):
    """Only bad input (QuietStarInputError, OSError) becomes a message: a bug raises, a plain
    ValueError or ImportError from inside the code included."""
    import quietstar.cli.inspect_thoughts as command

    def fails(*args, **kwargs):
        raise bug

    monkeypatch.setattr("quietstar.evaluation.viewer.write_page", fails)  # run() imports it
    monkeypatch.setattr(command.LoadingArguments, "load", lambda self, model, device: None)
    with pytest.raises(type(bug), match="a bug"):
        cli.main(["inspect", "--model", "m", "--text", "hi there", "--out", str(tmp_path / "page.html")])


@pytest.mark.parametrize("error", [QuietStarInputError("bad input"), MissingDependencyError("pip install x"),
                                   FileNotFoundError("no such file")], ids=lambda e: type(e).__name__)
def test_bad_input_shows_its_traceback_only_when_asked(tmp_path, monkeypatch, capsys, error):
    import quietstar.cli.inspect_thoughts as command

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(command.LoadingArguments, "load", fails)
    argv = ["inspect", "--model", "m", "--text", "hi", "--out", str(tmp_path / "page.html")]
    monkeypatch.delenv("QUIETSTAR_TRACEBACK", raising=False)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"quietstar inspect: error: {error}\n"
    monkeypatch.setenv("QUIETSTAR_TRACEBACK", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in fails" in err
    assert err.endswith(f"quietstar inspect: error: {error}\n")


def test_a_multi_line_message_is_joined_into_one(tmp_path, monkeypatch, capsys):
    import quietstar.cli.inspect_thoughts as command

    def fails(*args, **kwargs):
        raise QuietStarInputError("first line\n  second line\n")

    monkeypatch.setattr(command.LoadingArguments, "load", fails)
    assert cli.main(["inspect", "--model", "m", "--text", "hi", "--out", str(tmp_path / "page.html")]) == 2
    assert capsys.readouterr().err == "quietstar inspect: error: first line; second line\n"


def test_ctrl_c_outside_training_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    import quietstar.cli.inspect_thoughts as command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command.LoadingArguments, "load", interrupted)
    assert cli.main(["inspect", "--model", "m", "--text", "hi", "--out", str(tmp_path / "page.html")]) == 130
    assert capsys.readouterr().err == "quietstar inspect: interrupted\n"
    assert not (tmp_path / "page.html").exists()
