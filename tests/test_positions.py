"""Position limits: a thought after position p continues the text's positions, so a text of L
tokens needs L + k + A + 1 position ids in training. Checked before any work: learned absolute
positions (GPT-2) refuse, rotary models warn."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import make_model, random_text

K, A = 3, 3  # make_model's


def test_absolute_positions_refuse_before_any_work():
    model = make_model("gpt2")  # n_positions 256
    fits = 256 - K - A - 1
    model(random_text(1, fits))  # exactly the last position id 255
    with pytest.raises(ValueError, match=r"a training step on 250 tokens needs position ids up to 256, "
                                         r"but GPT2LMHeadModel has 256 positions"):
        model(random_text(1, fits + 1))
    with pytest.raises(ValueError, match="scoring thoughts on 250 tokens"):
        model.score_thoughts(random_text(1, fits + 1), random_text(fits + 1, K).view(1, fits + 1, K))
    with pytest.raises(ValueError, match="sampling thoughts on 254 tokens"):
        model.sample_thoughts(random_text(1, 254))
    model.sample_thoughts(random_text(1, 253))
    with pytest.raises(ValueError, match="generating 20 tokens after a 240-token prompt"):
        model.generate(random_text(1, 240), max_new_tokens=20)
    model.generate(random_text(1, 240), max_new_tokens=256 - 240 - K - 1, thought_tokens=K)  # fits exactly
    with pytest.raises(ValueError, match="generating"):
        model.generate(random_text(1, 240), max_new_tokens=256 - 240 - K, thought_tokens=K)
    model.generate(random_text(1, 240), max_new_tokens=17, thought_tokens=0)  # no thought: up to 256


def test_rotary_positions_warn_beyond_the_trained_range():
    model = make_model("llama")  # max_position_embeddings 256, rotary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(random_text(1, 256 - K - A - 1))
    with pytest.warns(UserWarning, match="rotary embeddings go beyond the range it was trained on"):
        out = model(random_text(1, 256 - K - A))
    assert torch.isfinite(out.loss)


def test_training_refuses_before_reading_data(tmp_path, capsys):
    from quietstar.cli.train import main

    from conftest import make_lm, make_tokenizer
    gpt2 = tmp_path / "gpt2"
    make_lm("gpt2").save_pretrained(gpt2)
    make_tokenizer().save_pretrained(gpt2)
    assert main(["--model", str(gpt2), "--data", str(tmp_path / "no-such-data.txt"), "--seq-len", "250",
                 "--sampled-thought-tokens", "3", "--ahead-tokens", "3", "--output-dir", str(tmp_path / "run")]) == 2
    # the position check, not the missing data file, stopped it
    assert "training on seq_len 250 with k=3, A=3 needs position ids up to 256" in capsys.readouterr().err
