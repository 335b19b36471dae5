"""Tests for quietstar.data.corpora: corpus generation, loading, packing, resumable batches, splits.

Everything is offline: the tokenizer is a tiny byte-level BPE trained here on the built-in corpus.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from quietstar.data import corpora as data
from quietstar.data.corpora import (
    TokenBatches,
    arithmetic_corpus,
    load_texts,
    pack_documents,
    heldout_split,
)


def make_tokenizer(eos_token: str | None = "<eos>", pad_token: str | None = "<pad>"):
    """A tiny byte-level BPE tokenizer (vocab 400) trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(arithmetic_corpus(200, seed=123), trainer)
    specials = {k: v for k, v in (("eos_token", eos_token), ("pad_token", pad_token)) if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _stream(texts, tokenizer):
    """Reference token stream: each document's ids followed by EOS."""
    out = []
    for t in texts:
        out += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    return out


# --------------------------------------------------------------------------- built-in corpus

EQUATION = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\d+)")


def test_arithmetic_corpus_deterministic_per_seed():
    a, b, c = arithmetic_corpus(50, seed=1), arithmetic_corpus(50, seed=1), arithmetic_corpus(50, 2)
    assert a == b
    assert a != c
    assert len(a) == 50 and all(isinstance(d, str) for d in a)
    state = random.getstate()
    arithmetic_corpus(20, seed=5)
    assert random.getstate() == state, "must not touch the global RNG"


def test_arithmetic_corpus_answers_are_correct():
    docs = arithmetic_corpus(600, seed=0)
    assert len(set(docs)) > 590
    questions = set()
    for doc in docs:
        assert doc.startswith("Question: ") and "\nAnswer: " in doc
        assert "\n\n" not in doc  # so "\n\n"-joined corpora round-trip through .txt
        body, final = doc.rsplit("\n#### ", 1)
        answer = int(final)  # the last line is exactly "#### <integer>"
        solution = body.split("\nAnswer: ", 1)[1]
        equations = EQUATION.findall(solution)
        assert len(equations) >= 2, doc
        for lhs, rhs in equations:
            assert eval(lhs) == int(rhs), f"wrong step {lhs} = {rhs} in:\n{doc}"  # digits/ops only
        assert int(equations[-1][1]) == answer, doc
        assert answer >= 0
        assert 50 <= len(doc.split()) <= 160, doc
        questions.add(body.split("?")[-2].split(". ")[-1])  # the question sentence
    assert len({re.sub(r"\d+", "N", q) for q in questions}) >= 30  # varied wording
    topics = ["change", "each friend", "earn", "miles", "library", "left", "flour", "garden",
              "ages", "discount", "split"]
    assert all(sum(t in d for d in docs) >= 10 for t in topics)  # every template is used


# --------------------------------------------------------------------------- loading


def test_load_builtin():
    assert load_texts("builtin:arithmetic", num_documents=7, seed=3) == arithmetic_corpus(7, 3)
    assert len(load_texts("builtin:arithmetic")) == 2000
    with pytest.raises(ValueError, match="builtin:arithmetic"):
        load_texts("builtin:nope")


def test_load_txt_blank_line_separated(tmp_path):
    docs = arithmetic_corpus(5, seed=9)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n\n\n")
    texts = load_texts(str(path))
    assert list(texts) == docs
    assert list(texts) == docs  # re-iterable, unlike a generator
    assert list(load_texts(str(path), num_documents=2)) == docs[:2]
    one = tmp_path / "one.txt"
    one.write_text("a single document\nwith two lines\n")
    assert list(load_texts(str(one))) == ["a single document\nwith two lines"]


def test_load_jsonl_json_and_fields(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "first"}\n\n{"text": "second"}\n')
    assert list(load_texts(str(jl))) == ["first", "second"]

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2+3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    assert list(load_texts(str(gsm))) == ["Question: What is 2+3?\nAnswer: 2 + 3 = 5\n#### 5"]

    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([{"body": "x", "text": "ignored"}, {"body": "y"}]))
    assert list(load_texts(str(arr), text_field="body")) == ["x", "y"]

    with pytest.raises(ValueError, match="no field 'missing'"):
        list(load_texts(str(jl), text_field="missing"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "z"}\n')
    with pytest.raises(ValueError, match="text_field"):
        list(load_texts(str(bad)))


def test_load_parquet_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), d / "c.parquet")
    (d / "a.txt").write_text("t1\n\nt2")
    (d / "sub" / "b.jsonl").write_text('{"text": "j1"}\n')
    (d / "notes.md").write_text("not data")
    assert list(load_texts(str(d / "c.parquet"))) == ["p1", "p2"]
    # sorted by path: a.txt, c.parquet, sub/b.jsonl; other file types ignored
    assert list(load_texts(str(d))) == ["t1", "t2", "p1", "p2", "j1"]


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_texts(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts("./no_such_dir_xyz")
    for no_hub_id in ("no/such/nested/dir", "my corpus", ".hidden"):  # never sent to the Hub
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_texts(no_hub_id)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="has no .txt"):
        load_texts(str(tmp_path / "empty_dir"))


def test_hub_dataset_name_config_and_records(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return [{"question": "q", "answer": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts = load_texts("someorg/gsm:main", split="test")
    assert list(texts) == ["Question: q\nAnswer: a"]
    assert list(texts) == ["Question: q\nAnswer: a"]
    assert calls == [("someorg/gsm", "main", "test", True)]
    load_texts("someorg/plain", streaming=False)
    assert calls[-1] == ("someorg/plain", None, "train", False)


def test_offline_unknown_hub_dataset_gives_clear_error(tmp_path):
    # A subprocess, because datasets reads the offline switches when it is imported.
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"))
    code = ("from quietstar.data.corpora import load_texts\n"
            "try:\n    load_texts('quietstar-tests/made-up-dataset-xyz')\n"
            "except ValueError as e:\n    print('VALUEERROR:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    msg = out.stdout
    assert "VALUEERROR:" in msg, out.stderr
    assert "quietstar-tests/made-up-dataset-xyz" in msg
    assert "could not be found locally or downloaded" in msg
    assert "builtin:arithmetic" in msg and "local" in msg


# --------------------------------------------------------------------------- packing


def test_pack_windows_exact_with_eos_and_unmasked_labels(tok):
    docs = arithmetic_corpus(20, seed=4)
    seq_len = 64
    examples = list(pack_documents(docs, tok, seq_len))
    stream = _stream(docs, tok)
    assert len(examples) == len(stream) // seq_len
    flat = []
    for ex in examples:
        assert set(ex) == {"input_ids", "attention_mask", "labels"}
        assert ex["input_ids"].shape == (seq_len,) and ex["input_ids"].dtype == torch.long
        assert torch.equal(ex["labels"], ex["input_ids"])  # EOS included in the loss
        assert bool(ex["attention_mask"].all())
        flat += ex["input_ids"].tolist()
    assert flat == stream[: len(flat)]
    n_eos = flat.count(tok.eos_token_id)
    assert n_eos >= len(docs) - 2  # every document boundary that fits keeps its EOS
    assert tok.pad_token_id not in flat


def test_pack_skips_empty_documents_and_no_double_eos(tok):
    eos = tok.eos_token
    examples = list(pack_documents(["ab", "", "   ", f"cd{eos}"], tok, seq_len=1))
    ids = [int(e["input_ids"]) for e in examples]
    assert ids.count(tok.eos_token_id) == 2


def test_pack_requires_eos(tok):
    no_eos = make_tokenizer(eos_token=None, pad_token=None)
    with pytest.raises(ValueError, match="no EOS"):
        list(pack_documents(["hello world"], no_eos, 8))
    ex = list(pack_documents(["hello world there"], no_eos, 2, add_eos=False))
    assert ex and all(e["input_ids"].shape == (2,) for e in ex)
    with pytest.raises(ValueError, match="mode"):
        list(pack_documents(["x"], tok, 8, mode="bogus"))


def test_crop_pads_and_masks_only_padding(tok):
    short, long_doc = "Question: hi", arithmetic_corpus(1, seed=0)[0]
    seq_len = 32
    a, b = pack_documents([short, long_doc], tok, seq_len, mode="crop")
    n = len(tok(short)["input_ids"]) + 1  # + EOS
    assert a["input_ids"].shape == (seq_len,)
    assert a["input_ids"][n - 1] == tok.eos_token_id and a["labels"][n - 1] == tok.eos_token_id
    assert a["attention_mask"].tolist() == [1] * n + [0] * (seq_len - n)
    assert (a["input_ids"][n:] == tok.pad_token_id).all()
    assert (a["labels"][n:] == -100).all() and torch.equal(a["labels"][:n], a["input_ids"][:n])
    assert bool(b["attention_mask"].all()) and torch.equal(b["labels"], b["input_ids"])
    assert b["input_ids"].tolist() == tok(long_doc)["input_ids"][:seq_len]


def test_crop_pad_falls_back_to_eos_without_masking_real_eos():
    tok = make_tokenizer(pad_token=None)
    (ex,) = pack_documents(["hi"], tok, 16, mode="crop")
    n = int(ex["attention_mask"].sum())
    assert (ex["input_ids"][n - 1:] == tok.eos_token_id).all()
    assert ex["labels"][n - 1] == tok.eos_token_id and (ex["labels"][n:] == -100).all()


# --------------------------------------------------------------------------- batches


def _take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_token_batches_shapes_and_determinism(tok):
    docs = arithmetic_corpus(60, seed=0)
    make = lambda seed: TokenBatches(docs, tok, seq_len=32, batch_size=4, seed=seed)  # noqa: E731
    first = _take(make(0), 5)
    for batch in first:
        assert {k: tuple(v.shape) for k, v in batch.items()} == {
            "input_ids": (4, 32), "attention_mask": (4, 32), "labels": (4, 32)}
        assert batch["input_ids"].dtype == torch.long
    again, other = _take(make(0), 5), _take(make(1), 5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, again))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, other))


def test_token_batches_one_epoch_covers_every_document(tok):
    docs = arithmetic_corpus(10, seed=2)
    kw = dict(seq_len=512, batch_size=1, mode="crop", epochs=1)
    plain = [b["input_ids"] for b in TokenBatches(docs, tok, shuffle=False, **kw)]
    shuffled = [b["input_ids"] for b in TokenBatches(docs, tok, seed=3, **kw)]
    assert len(plain) == len(shuffled) == 10
    key = lambda t: t.tolist()  # noqa: E731
    assert sorted(map(key, plain)) == sorted(map(key, shuffled))
    assert list(map(key, plain)) != list(map(key, shuffled))
    # the streaming buffer shuffle is a permutation too
    out = list(data._buffer_shuffle(range(100), 8, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


@pytest.mark.parametrize("consumed", [3, 11])  # 11 crosses an epoch boundary
def test_token_batches_resume_gives_identical_next_batch(tok, consumed):
    docs = arithmetic_corpus(30, seed=1)  # about 8 batches per epoch at these sizes
    make = lambda: TokenBatches(docs, tok, seq_len=48, batch_size=4, seed=7,  # noqa: E731
                                shuffle_buffer=8)
    original = make()
    it = iter(original)
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(original.state_dict()))  # must survive a JSON checkpoint
    assert state["batches_consumed"] == consumed
    expected = [next(it) for _ in range(3)]

    resumed = make()
    resumed.load_state_dict(state)
    got = _take(resumed, 3)
    for e, g in zip(expected, got):
        for k in e:
            assert torch.equal(e[k], g[k])
    assert resumed.state_dict() == original.state_dict()

    with pytest.raises(ValueError, match="seq_len"):
        TokenBatches(docs, tok, seq_len=16, batch_size=4, seed=7).load_state_dict(state)


def test_token_batches_errors(tok):
    with pytest.raises(ValueError, match=r"mydata has no documents: it holds no text \(empty files"):
        next(iter(TokenBatches([], tok, 64, 2, name="mydata")))
    with pytest.raises(ValueError, match=r"mydata produced no complete sequence of 64 tokens; "
                                         r"use a shorter --seq-len, mode crop, or more data"):
        next(iter(TokenBatches(["a few words"], tok, 64, 2, name="mydata")))
    with pytest.raises(ValueError, match="no complete sequence of 4096 tokens"):
        next(iter(TokenBatches(["tiny document"], tok, 4096, 1)))
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        next(iter(TokenBatches(["one", "two"], tok, 8, 8, mode="crop")))
    with pytest.raises(TypeError, match="re-iterable"):
        TokenBatches((d for d in ["x"]), tok, 8, 1)
    # drop_last=False keeps the partial batch instead of failing
    (batch,) = TokenBatches(["one", "two"], tok, 8, 8, mode="crop", drop_last=False, epochs=1)
    assert batch["input_ids"].shape == (2, 8)


def test_token_batches_from_load_texts(tmp_path, tok):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(arithmetic_corpus(40, seed=5)))
    batches = TokenBatches(load_texts(str(path)), tok, 32, 2, seed=0, shuffle_buffer=5, epochs=2)
    n = sum(1 for _ in batches)
    assert n > 0 and n % 2 == 0 and batches.epoch == 2


# --------------------------------------------------------------------------- split


def test_heldout_split_first_documents_and_no_duplicate_on_both_sides():
    docs = arithmetic_corpus(50, seed=0)
    docs = docs[:5] + docs[1:2] + docs[5:] + docs[3:4]  # duplicates of held-out documents later
    held, rest = heldout_split(docs, 5)
    assert held == docs[:5]
    rest = list(rest)
    assert set(rest).isdisjoint(held)
    assert rest == [d for d in docs[5:] if d not in set(held)]  # order kept, duplicates dropped
    assert len(rest) == len(docs) - 5 - 2
    assert list(rest) == list(heldout_split(docs, 5)[1])       # re-iterable, deterministic
    held, rest = heldout_split(docs, 0)
    assert held == [] and list(rest) == docs
    with pytest.raises(ValueError, match="num_heldout"):
        heldout_split(docs, -1)


# ------------------------------------------------------------------ errors that name the file and line
def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "third", oops}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3 is not valid JSON (") + ".*one JSON record per line"):
        list(load_texts(str(path)))


@pytest.mark.parametrize("suffix, content, line", [
    (".jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2),
    (".txt", b"one\n\ntwo\nthree \xff\n", 4),
    (".json", b'[{"text": "a"},\n {"text": "\xfe"}]', 2),
])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, suffix, content, line):
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line} is not UTF-8 text (") + ".*save the file as UTF-8"):
        list(load_texts(str(path)))


def test_a_utf8_byte_order_mark_is_not_an_error(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "with a BOM"}\n'.encode())
    (tmp_path / "bom.txt").write_bytes("\ufeffplain text".encode())
    assert list(load_texts(str(tmp_path / "bom.jsonl"))) == ["with a BOM"]
    assert list(load_texts(str(tmp_path / "bom.txt"))) == ["plain text"]


def test_a_corpus_emptied_by_the_heldout_deduplication_says_so(tok):
    """Every training document repeats a held-out one: the message names the de-duplication
    (not a shorter sequence, which would not help)."""
    heldout, rest = heldout_split(["the same document"] * 5, 1)
    batches = TokenBatches(rest, tok, seq_len=4, batch_size=1, name="training data 'dups.txt'")
    with pytest.raises(ValueError) as error:
        next(iter(batches))
    assert str(error.value) == (
        "training data 'dups.txt' has no documents: each of its 4 documents after the 1 held out for "
        "evaluation repeats a held-out one, and the held-out split keeps such duplicates out of "
        "training; use data with more distinct documents or a smaller --eval-documents")
    assert "shorter" not in str(error.value)


def test_a_corpus_wholly_held_out_says_so(tok):
    _, rest = heldout_split(["one document", "another one"], 2)
    with pytest.raises(ValueError, match=r"has no documents: all its documents are among the 2 held out "
                                         r"for evaluation; use more data or a smaller --eval-documents"):
        next(iter(TokenBatches(rest, tok, seq_len=4, batch_size=1)))


def test_blank_documents_after_the_split_are_no_text(tok):
    _, rest = heldout_split(["held out", "   ", "\n"], 1)
    with pytest.raises(ValueError, match=r"has no documents: it holds no text \(empty files or blank"):
        next(iter(TokenBatches(rest, tok, seq_len=4, batch_size=1)))


def test_scratchpad_corpus_writes_true_partial_products():
    from quietstar.data.scratchpad import partial_products, scratchpad_corpus, scratchpad_tokenizer
    docs = scratchpad_corpus(40, seed=2)
    assert docs == scratchpad_corpus(40, seed=2) and docs != scratchpad_corpus(40, seed=3)
    assert load_texts("builtin:scratchpad", num_documents=40, seed=2) == docs
    tok, kinds = scratchpad_tokenizer(), set()
    for doc in docs:
        assert len(tok(doc).input_ids) == len(doc.split())  # one token per word
        for problem in doc.rstrip(" ;").split(" ; "):
            w = problem.split()
            a, b, c, e = int(w[0]), int(w[2]), int(w[4]), int(w[6])
            p, q, d = partial_products(a, b, c, e)
            assert d == (a * b + c * e) % 10 and int(w[-1]) == d
            if w[8] == "---":
                assert w[8:12] == ["---", str(p), str(q), "---"]
            kinds.add(w[8] == "---")
    assert kinds == {True, False}  # both worked and terse documents
    assert all("---" not in d for d in scratchpad_corpus(10, seed=1, worked_fraction=0.0))
    with pytest.raises(ValueError, match="worked_fraction must be in"):
        scratchpad_corpus(1, seed=0, worked_fraction=1.5)


def test_scratchpad_decoys_hold_the_operands_and_no_answer():
    from quietstar.data.scratchpad import partial_products, scratchpad_corpus
    docs = scratchpad_corpus(200, seed=4, worked_fraction=1.0, decoy_fraction=0.5)
    kinds = []
    for problem in " ; ".join(d.rstrip(" ;") for d in docs).split(" ; "):
        w = problem.split()
        a, b, c, e = int(w[0]), int(w[2]), int(w[4]), int(w[6])
        p, q, d = partial_products(a, b, c, e)
        decoy = len(w) == 12  # "a * b + c * e = --- a c ---": no answer
        assert w[8:12] == (["---", str(a), str(c), "---"] if decoy else ["---", str(p), str(q), "---"])
        assert decoy or int(w[12]) == d
        kinds.append(decoy)
    assert 0.45 < sum(kinds) / len(kinds) < 0.55
    # no decoys by default, and the default corpus draws the same numbers as before decoys existed
    assert scratchpad_corpus(30, seed=4) == scratchpad_corpus(30, seed=4, decoy_fraction=0.0)
    assert all(len(problem.split()) != 12 for d in scratchpad_corpus(30, seed=4, worked_fraction=1.0)
               for problem in d.rstrip(" ;").split(" ; "))
    with pytest.raises(ValueError, match="decoy_fraction must be in"):
        scratchpad_corpus(1, seed=0, decoy_fraction=-0.1)
