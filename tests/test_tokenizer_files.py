"""Saved tokenizers come back exactly (quietstar.models.tokenizer_files), whatever architecture the
folder's config names, and a reload that would tokenize differently is refused."""

from __future__ import annotations

import json

import pytest
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from conftest import TOKENIZER_SIZE, make_lm, make_tokenizer
from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.cli import main as cli
from quietstar.models.loading import load_base_model
from quietstar.models.tokenizer_files import CHECK_NAME, PROBES, load_tokenizer

TEXTS = PROBES + ("Weng earns $12 an hour.\n\n\nShe did 50 minutes.", " leading", "trailing\n", "")


def wordlevel_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Another kind of tokenizer: word-level, lower-casing normaliser, whitespace splitting."""
    vocab = {"[UNK]": 0, "<pad>": 1, "<eos>": 2, "natalia": 3, "sold": 4, "48": 5, "clips": 6, "---": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="[UNK]")


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma", "gpt2"])
@pytest.mark.parametrize("kind", ["bpe", "wordlevel"])
def test_saved_model_reloads_its_own_tokenizer(tmp_path, family, kind):
    """The BPE tokenizer of the tests in a qwen2 folder is what AutoTokenizer replaces with a
    Qwen2Tokenizer (different ids); every family and kind must give back the saved ids."""
    tokenizer = make_tokenizer() if kind == "bpe" else wordlevel_tokenizer()
    model = QuietStarForCausalLM.from_base(make_lm(family, vocab_size=TOKENIZER_SIZE), tokenizer,
                                           QuietStarConfig(sampled_thought_tokens=2, ahead_tokens=2))
    before = [model.tokenizer(t).input_ids for t in TEXTS]
    model.save_pretrained(tmp_path / "m")
    again = QuietStarForCausalLM.from_pretrained(tmp_path / "m")
    assert [again.tokenizer(t).input_ids for t in TEXTS] == before
    assert (again.start_id, again.end_id) == (model.start_id, model.end_id)
    lm, plain = load_base_model(tmp_path / "m")  # the same folder as a base model
    assert [plain(t).input_ids for t in TEXTS] == before


def test_autotokenizer_alone_would_change_the_ids(tmp_path):
    """Why load_tokenizer exists: for this folder AutoTokenizer builds another tokenizer."""
    model = QuietStarForCausalLM.from_base(make_lm("qwen2"), make_tokenizer(), QuietStarConfig())
    model.save_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = PROBES[0]
    assert auto(text).input_ids != model.tokenizer(text).input_ids
    assert load_tokenizer(tmp_path)(text).input_ids == model.tokenizer(text).input_ids


def test_a_reload_that_tokenizes_differently_is_refused(tmp_path):
    model = QuietStarForCausalLM.from_base(make_lm("llama"), make_tokenizer(), QuietStarConfig())
    model.save_pretrained(tmp_path)
    check = json.loads((tmp_path / CHECK_NAME).read_text(encoding="utf-8"))
    check["ids"][1] = [5, 6, 7]  # as if the saved tokenizer had split the second probe otherwise
    (tmp_path / CHECK_NAME).write_text(json.dumps(check), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizes '  two  spaces.*but the saved one as \[5, 6, 7\]"):
        QuietStarForCausalLM.from_pretrained(tmp_path)
    (tmp_path / CHECK_NAME).write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="is damaged"):
        QuietStarForCausalLM.from_pretrained(tmp_path)
    (tmp_path / CHECK_NAME).unlink()  # a folder saved before the check existed still loads
    QuietStarForCausalLM.from_pretrained(tmp_path)


def test_the_base_model_loader_refuses_a_reload_that_tokenizes_differently(tmp_path, capsys):
    """A saved model trained on (``quietstar train --model DIR``) is read by load_base_model, not
    from_pretrained: the same check must refuse a tokenizer that reads back differently there,
    before any training (else every token id of the run means another token)."""
    model = QuietStarForCausalLM.from_base(make_lm("llama"), make_tokenizer(), QuietStarConfig())
    model.save_pretrained(tmp_path / "m")
    load_base_model(tmp_path / "m")  # as saved: loads
    check = json.loads((tmp_path / "m" / CHECK_NAME).read_text(encoding="utf-8"))
    check["ids"][1] = [5, 6, 7]
    (tmp_path / "m" / CHECK_NAME).write_text(json.dumps(check), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizes '  two  spaces.*but the saved one as \[5, 6, 7\]"):
        load_base_model(tmp_path / "m")
    assert cli.main(["train", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "run"),
                     "--max-steps", "1"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("quietstar train: error: the tokenizer read back from ") and "[5, 6, 7]" in error
    assert not (tmp_path / "run").exists()  # refused before the run folder
