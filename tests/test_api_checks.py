"""The Python API's bad input, refused with a message that names it and the fix instead of an
error from inside torch or safetensors: a tokenizer larger than the LM's embedding, wrapping a
wrapped model (or no model), padding without its attention mask, a damaged weights file."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from conftest import TOKENIZER_SIZE, make_lm, make_model, make_tokenizer, random_text
from quietstar import QuietStarConfig, QuietStarForCausalLM, QuietStarInputError


# ------------------------------------------------------------------------------ from_base
def test_a_tokenizer_larger_than_the_embedding_is_refused_before_it_is_changed():
    tokenizer = make_tokenizer()
    lm = make_lm(vocab_size=TOKENIZER_SIZE - 5)
    with pytest.raises(QuietStarInputError, match=rf"the tokenizer has {TOKENIZER_SIZE} tokens but "
                                                  rf"LlamaForCausalLM's embeddings have {TOKENIZER_SIZE - 5} rows, so "
                                                  rf"token ids {TOKENIZER_SIZE - 5}..{TOKENIZER_SIZE - 1} have none; "
                                                  r"resize the model to its tokenizer first, "
                                                  r"model.resize_token_embeddings\(len\(tokenizer\)\)"):
        QuietStarForCausalLM.from_base(lm, tokenizer, QuietStarConfig(sampled_thought_tokens=2))
    assert len(tokenizer) == TOKENIZER_SIZE  # no meta tokens were added to it
    lm.resize_token_embeddings(len(tokenizer))  # the fix the message names
    model = QuietStarForCausalLM.from_base(lm, tokenizer, QuietStarConfig(sampled_thought_tokens=2))
    assert torch.isfinite(model(random_text(1, 8, vocab=TOKENIZER_SIZE)).loss)


def test_meta_tokens_beyond_the_embedding_are_no_mismatch(tmp_path):
    # every real model: the meta tokens that from_base adds (or a saved tokenizer holds) live apart
    model = make_model(vocab_size=TOKENIZER_SIZE)
    model.save_pretrained(tmp_path / "m")
    assert QuietStarForCausalLM.from_pretrained(tmp_path / "m").start_id >= TOKENIZER_SIZE


def test_a_smaller_lm_head_is_refused_too():
    lm = make_lm()
    lm.lm_head = torch.nn.Linear(32, TOKENIZER_SIZE - 1, bias=False)
    with pytest.raises(QuietStarInputError, match=f"embeddings have {TOKENIZER_SIZE - 1} rows"):
        QuietStarForCausalLM.from_base(lm, make_tokenizer())


def test_wrapping_a_wrapped_model_or_no_model_is_refused():
    model = make_model()
    with pytest.raises(QuietStarInputError, match=r"the model is a QuietStarForCausalLM already: use it as it "
                                                  r"is, or wrap its base LM anew with "
                                                  r"QuietStarForCausalLM.from_base\(model.lm, model.tokenizer"):
        QuietStarForCausalLM.from_base(model, make_tokenizer())
    again = QuietStarForCausalLM.from_base(model.lm, model.tokenizer, model.config)  # the fix it names
    assert again.start_id == model.start_id
    for not_a_model in ("HuggingFaceTB/SmolLM2-135M", make_tokenizer()):
        with pytest.raises(QuietStarInputError, match=r"from_base wraps a loaded transformers causal LM, got "
                                                      r"\w+; load one first"):
            QuietStarForCausalLM.from_base(not_a_model, make_tokenizer())


def test_no_tokenizer_or_a_config_of_another_type_is_refused():
    for tokenizer in (None, "HuggingFaceTB/SmolLM2-135M"):
        with pytest.raises(QuietStarInputError, match=r"from_base needs the LM's tokenizer \(AutoTokenizer"):
            QuietStarForCausalLM.from_base(make_lm(), tokenizer)
    with pytest.raises(QuietStarInputError, match=r"config must be a QuietStarConfig, got dict; e.g. "
                                                  r"QuietStarConfig\(\*\*settings\)"):
        QuietStarForCausalLM.from_base(make_lm(), make_tokenizer(), {"sampled_thought_tokens": 2})


# ------------------------------------------------------------------------------ padding without a mask
def _left_padded(tokenizer, pad_id):
    ids = random_text(2, 10)
    ids[1, :4] = pad_id
    return ids


def test_padding_without_its_mask_is_refused():
    model = make_model()
    pad = model.tokenizer.pad_token_id  # "<pad>": never a token of text
    ids = _left_padded(model.tokenizer, pad)
    message = r"input_ids has rows that start or end with the pad token \(id 0\) and no attention_mask"
    for call in (lambda: model(ids), lambda: model.base_logits(ids), lambda: model.sample_thoughts(ids),
                 lambda: model.score_thoughts(ids, random_text(20, 3).view(2, 10, 3)),
                 lambda: model.think(ids), lambda: model.generate(ids, max_new_tokens=2)):
        with pytest.raises(QuietStarInputError, match=message):
            call()
    right = random_text(2, 10)
    right[0, -3:] = pad
    with pytest.raises(QuietStarInputError, match=message):
        model(right)
    mask = (ids != pad).long()
    model(ids, mask)  # with the mask: fine
    model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(random_text(2, 10))  # no padding: no mask needed


def test_a_pad_token_that_is_also_eos_only_warns():
    tokenizer = make_tokenizer(pad=False)
    tokenizer.pad_token = tokenizer.eos_token  # the common setting: a row may start with a real EOS
    model = QuietStarForCausalLM.from_base(make_lm(), tokenizer, QuietStarConfig(sampled_thought_tokens=2,
                                                                                  ahead_tokens=2))
    ids = random_text(1, 10)
    ids[0, 0] = tokenizer.eos_token_id  # e.g. a packed window that begins at a document's end
    with pytest.warns(UserWarning, match="The pad token is also this tokenizer's EOS or BOS"):
        out = model(ids)
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------ damaged weights
@pytest.fixture
def cut_short(tmp_path, tiny_model_dir):
    """A copy of the tiny model folder whose model.safetensors lost its second half."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def test_a_truncated_base_model_is_named(cut_short):
    from quietstar.models.loading import load_base_model

    with pytest.raises(QuietStarInputError, match=rf"{cut_short / 'model.safetensors'} is damaged \(.*\): it was "
                                                  r"probably cut short by an interrupted download or copy; download "
                                                  r"it again .* or re-save the model"):
        load_base_model(cut_short)


def test_a_truncated_saved_model_is_named(tmp_path):
    make_model().save_pretrained(tmp_path / "qs")
    weights = tmp_path / "qs" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(QuietStarInputError, match=r"model.safetensors is damaged"):
        QuietStarForCausalLM.from_pretrained(tmp_path / "qs")


def test_the_commands_report_a_truncated_model_on_one_line(cut_short, capsys):
    from quietstar.cli.main import main

    assert main(["generate", "--model", str(cut_short), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quietstar generate: error: {cut_short / 'model.safetensors'} is damaged")
    assert "Traceback" not in err
