"""Data that would train silently wrong: a null or non-string text, a .txt file read as one
document, a settings file that gives a key twice, a held-out split larger than a small corpus."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import yaml

from quietstar.data.corpora import default_heldout, heldout_split, load_texts
from quietstar.training.config import TrainConfig, load_config
from quietstar.utils.settings import read_yaml


def lines(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ------------------------------------------------------------------------------ record fields
def test_a_null_text_is_skipped_and_reported_with_where_and_how_many(tmp_path):
    path = lines(tmp_path / "c.jsonl", {"text": "one"}, {"text": None}, {"text": "three"}, {"text": None})
    with pytest.warns(UserWarning) as caught:
        assert list(load_texts(path)) == ["one", "three"]  # not "None"
    messages = [str(w.message) for w in caught]
    assert messages == [f"{path}:2: the record's text is null; skipping it (and any other such record of {path}: "
                        "no text, no document)",
                        f"{path}: skipped 2 records whose text is null (the first at {path}:2)"]


@pytest.mark.parametrize("value, kind", [(["a", "b"], "a list"), ({"a": 1}, "an object"), (42, "a number"),
                                         (True, "a boolean")])
def test_a_text_that_is_not_a_string_is_refused_with_file_line_and_field(tmp_path, value, kind):
    path = lines(tmp_path / "c.jsonl", {"text": "fine"}, {"text": value})
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: field 'text' holds {kind} (") +
                       r".*not a string of text; fix the record"):
        list(load_texts(path))


def test_other_layouts_and_fields_are_checked_alike(tmp_path):
    qa = lines(tmp_path / "qa.jsonl", {"question": "q", "answer": None}, {"question": ["q"], "answer": "a"})
    with pytest.warns(UserWarning, match=re.escape(f"{qa}:1: the record's text is null")):
        with pytest.raises(ValueError, match=re.escape(f"{qa}:2: field 'question' holds a list")):
            list(load_texts(qa))
    field = lines(tmp_path / "f.jsonl", {"body": 3.5})
    with pytest.raises(ValueError, match=re.escape(f"{field}:1: field 'body' holds a number (3.5)")):
        list(load_texts(field, text_field="body"))
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "x"}, {"text": [1]}]))
    with pytest.raises(ValueError, match=re.escape(f"{array} record 1: field 'text' holds a list")):
        list(load_texts(str(array)))


def test_parquet_rows_and_hub_records_are_checked_alike(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    with pytest.warns(UserWarning, match=re.escape(f"{path} row 1: the record's text is null")):
        assert list(load_texts(str(path))) == ["a", "c"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: [{"text": "a"}, {"text": ["b"]}])
    with pytest.raises(ValueError, match=re.escape("someorg/corpus record 1: field 'text' holds a list")):
        list(load_texts("someorg/corpus"))


def test_training_refuses_a_list_before_any_step(tmp_path, capsys, tiny_model_dir):
    from quietstar.cli.train import main

    data = lines(tmp_path / "c.jsonl", *({"text": f"document {i} " * 5} for i in range(30)),
                 {"text": ["a", "list"]})
    assert main(["--model", str(tiny_model_dir), "--data", data, "--eval-every", "0", "--max-steps", "1",
                 "--seq-len", "8", "--output-dir", str(tmp_path / "run")]) == 2
    assert f"{data}:31: field 'text' holds a list" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ .txt documents
def test_a_txt_file_without_blank_lines_is_one_document_and_warns_when_large(tmp_path):
    one_per_line = tmp_path / "lines.txt"
    one_per_line.write_text("".join(f"document number {i}\n" for i in range(2000)))
    with pytest.warns(UserWarning, match=re.escape(f"{one_per_line} is one document of 40,889 characters on "
                                                   "2,000 lines: a .txt file's documents are separated by blank "
                                                   "lines and it has none")):
        assert len(list(load_texts(str(one_per_line)))) == 1
    apart = tmp_path / "apart.txt"
    apart.write_text("".join(f"document number {i}\n\n" for i in range(2000)))
    small = tmp_path / "small.txt"
    small.write_text("a short note\nof two lines\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(load_texts(str(apart)))) == 2000
        assert list(load_texts(str(small))) == ["a short note\nof two lines"]


def test_the_txt_layout_is_in_the_help(capsys):
    from quietstar.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "a .txt file's documents are separated by blank lines" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------ duplicate YAML keys
@pytest.mark.parametrize("text, key, first, second", [
    ("seq_len: 32\nmax_steps: 5\nseq_len: 64\n", "seq_len", 1, 3),
    ("quietstar:\n  ahead_tokens: 2\nseq_len: 8\nquietstar:\n  thought_temperature: 0.5\n", "quietstar", 1, 4),
    ("quietstar:\n  ahead_tokens: 2\n  ahead_tokens: 3\n", "ahead_tokens", 2, 3),
    ("{seq_len: 8, seq_len: 16}\n", "seq_len", 1, 1),
])
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, text, key, first, second):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)  # what PyYAML alone does: the last one wins, silently
    with pytest.raises(ValueError, match=re.escape(f"config file {path} gives {key!r} twice, at lines {first} and "
                                                   f"{second} (YAML would keep the last silently); keep one")):
        read_yaml(path)
    with pytest.raises(ValueError, match="twice"):
        load_config(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: &base {seq_len: 8, max_steps: 3}\nrun:\n  <<: *base\n  seq_len: 16\n")
    assert read_yaml(path)["run"] == {"seq_len": 16, "max_steps": 3}


def test_the_command_refuses_a_key_given_twice_before_any_work(tmp_path, capsys, tiny_model_dir):
    from quietstar.cli.train import main

    (tmp_path / "run.yaml").write_text(f"model: {tiny_model_dir}\nseq_len: 8\nmax_steps: 1\nmax_steps: 2\n")
    assert main(["--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.endswith("gives 'max_steps' twice, at lines 3 and 4 (YAML would keep the last "
                                            "silently); keep one of them\n")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ the held-out default
@pytest.mark.parametrize("documents, held", [(1, 1), (9, 1), (40, 4), (999, 99), (1000, 100), (5000, 100), (0, 0)])
def test_the_default_heldout_is_a_tenth_at_most_100(documents, held):
    texts = [f"document {i}" for i in range(documents)]
    assert default_heldout(texts) == held
    heldout, rest = heldout_split(texts)
    assert heldout == texts[:held] and len(list(rest)) == documents - held


def test_a_small_corpus_trains_with_the_default_heldout(tmp_path, tiny_model_dir):
    from quietstar.training.recipe import train

    data = tmp_path / "small.txt"
    data.write_text("".join(f"document {i} has a few words\n\n" for i in range(30)))
    config = TrainConfig.from_dict(dict(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"),
                                        seq_len=8, max_steps=1, eval_every=1, eval_batches=1, sample_every=0,
                                        quietstar={"sampled_thought_tokens": 1, "ahead_tokens": 1}))
    assert config.eval_documents is None
    result = train(config)  # 3 of its 30 documents held out
    assert "eval/nll_with_thought" in result.metrics


def test_too_many_heldout_documents_name_the_numbers(tmp_path, tiny_model_dir, capsys):
    from quietstar.cli.train import main

    data = tmp_path / "small.txt"
    data.write_text("".join(f"document {i} has a few words\n\n" for i in range(30)))
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--eval-documents", "100", "--seq-len", "8",
                 "--output-dir", str(tmp_path / "run")]) == 2
    assert ("has only 30 documents, all taken for evaluation (--eval-documents 100); leave --eval-documents unset "
            "(a tenth: 3 here), give a smaller one") in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_documents must be None"):
        TrainConfig(eval_documents=0)


def test_bad_data_met_mid_run_saves_the_steps_done_first(tmp_path, tiny_model_dir):
    from quietstar.training.checkpoint import list_checkpoints, step_of
    from quietstar.training.recipe import train

    # The training order shuffles through a buffer of 10,000 documents, tokenised 64 at a time: a bad
    # record after those is read only once training has taken some steps.
    records = [{"text": f"doc {i} is here"} for i in range(10_200)]
    records[10_100] = {"text": ["a", "list"]}
    data = lines(tmp_path / "big.jsonl", *records)
    config = TrainConfig.from_dict(dict(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "run"),
                                        seq_len=64, max_steps=200, checkpoint_every=1000, eval_every=0,
                                        sample_every=0, quietstar={"sampled_thought_tokens": 1, "ahead_tokens": 1}))
    with pytest.raises(ValueError, match=re.escape(f"{data}:10101: field 'text' holds a list") +
                       r".*; the (\d+) steps done are saved in .*checkpoint-0*\1: fix the data, then continue with "
                       r"--resume") as error:
        train(config)
    [saved] = list_checkpoints(tmp_path / "run")
    assert 0 < step_of(saved) < 200 and f"the {step_of(saved)} steps done" in str(error.value)


def test_windows_line_ends_separate_txt_documents_too(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"first document\r\nstill the first\r\n\r\nthe second\r\n \r\nthe third\r\n")
    assert list(load_texts(str(path))) == ["first document\r\nstill the first", "the second", "the third"]
