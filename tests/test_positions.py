"""Position limits and memory: a thought after position p continues the text's positions, so a
text of L tokens needs L + k + A + 1 position ids in training. Checked before any work: learned
absolute positions (GPT-2) refuse always, rotary models unless allow_position_extrapolation; a
training step whose activations clearly exceed the memory refuses with both numbers. The
commands check from the model's config file, before the weights load."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from conftest import make_lm, make_model, make_tokenizer, random_text
from quietstar import QuietStarConfig
from quietstar.models import limits

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


def test_absolute_positions_refuse_even_when_extrapolation_is_allowed():
    model = make_model("gpt2", allow_position_extrapolation=True)
    with pytest.raises(ValueError, match="its learned position embeddings end there"):
        model(random_text(1, 256 - K - A))
    with pytest.raises(ValueError, match="learned position embeddings"):
        model.generate(random_text(1, 240), max_new_tokens=20, allow_position_extrapolation=True)


def test_rotary_positions_refuse_unless_extrapolation_is_allowed():
    model = make_model("llama")  # max_position_embeddings 256, rotary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(random_text(1, 256 - K - A - 1))
    with pytest.raises(ValueError, match=r"a training step on 250 tokens needs position ids up to 256, but "
                                         r"LlamaForCausalLM has 256 positions \(max_position_embeddings\): its "
                                         r"rotary positions were never trained there.*opt in with "
                                         r"allow_position_extrapolation"):
        model(random_text(1, 256 - K - A))
    with pytest.raises(ValueError, match="generating 30 tokens after a 240-token prompt"):
        model.generate(random_text(1, 240), max_new_tokens=30, thought_tokens=1)
    model.config.allow_position_extrapolation = True  # opted in: computed, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(random_text(1, 256 - K - A))
        model.generate(random_text(1, 240), max_new_tokens=30, thought_tokens=1)
    assert torch.isfinite(out.loss)
    model.config.allow_position_extrapolation = False  # generate's own argument opts in too
    assert model.generate(random_text(1, 240), max_new_tokens=30, thought_tokens=1,
                          allow_position_extrapolation=True).shape == (1, 270)


def test_extrapolation_setting_is_saved_with_the_model(tmp_path):
    model = make_model("llama", allow_position_extrapolation=True)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "quietstar_config.json").read_text())["allow_position_extrapolation"]
    assert QuietStarConfig().allow_position_extrapolation is False
    config = json.loads((tmp_path / "m" / "quietstar_config.json").read_text())
    del config["allow_position_extrapolation"]  # a model saved before the setting existed
    assert QuietStarConfig.from_dict(config).allow_position_extrapolation is False


def _plain_folder(root, family="llama", weights=True, **config):
    """A plain model folder; without ``weights`` only its config and tokenizer (it cannot load)."""
    lm = make_lm(family)
    for key, value in config.items():
        setattr(lm.config, key, value)
    if weights:
        lm.save_pretrained(root)
    else:
        root.mkdir(parents=True)
        lm.config.architectures = [type(lm).__name__]  # as save_pretrained writes it
        lm.config.save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


def test_training_refuses_before_reading_data(tmp_path, capsys):
    from quietstar.cli.train import main

    gpt2 = tmp_path / "gpt2"
    make_lm("gpt2").save_pretrained(gpt2)
    make_tokenizer().save_pretrained(gpt2)
    assert main(["--model", str(gpt2), "--data", str(tmp_path / "no-such-data.txt"), "--seq-len", "250",
                 "--sampled-thought-tokens", "3", "--ahead-tokens", "3", "--output-dir", str(tmp_path / "run")]) == 2
    # the position check, not the missing data file, stopped it
    assert "training on seq_len 250 with k=3, A=3 needs position ids up to 256" in capsys.readouterr().err


def test_training_refuses_from_the_config_file_before_the_model_loads(tmp_path, capsys):
    from quietstar.cli.train import main

    folder = _plain_folder(tmp_path / "llama", weights=False)  # loading it would fail: no weights
    run = tmp_path / "existing-run"
    run.mkdir()
    argv = ["--model", str(folder), "--seq-len", "250", "--sampled-thought-tokens", "3", "--ahead-tokens", "3",
            "--output-dir", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training on seq_len 250 with k=3, A=3 needs position ids up to 256, but LlamaForCausalLM has 256" in err
    assert "--allow-position-extrapolation" in err
    assert list(run.iterdir()) == []  # no train_config.yaml written into the given folder
    # opted in: the check passes, and the missing weights stop it (at loading)
    assert main(argv + ["--allow-position-extrapolation"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_training_counts_the_thought_prefix_before_the_model_loads(tmp_path, capsys):
    """The early check counts the thought_prefix's tokens, read with the base model's tokenizer as
    the model reads them ("Q:" is 2 tokens): seq_len 249 with k = 3, A = 3 needs 249 + 3 + 3 + 1
    = 256 positions without the prefix and 258 with it, so it is refused before the model loads,
    naming the prefix, as the model's own check refuses it; seq_len 247 fits exactly, and the
    missing weights stop it, at loading."""
    from quietstar.cli.train import main

    folder = _plain_folder(tmp_path / "llama", weights=False)  # loading it would fail: no weights
    run = tmp_path / "run"
    argv = ["--model", str(folder), "--sampled-thought-tokens", "3", "--ahead-tokens", "3", "--thought-prefix", "Q:",
            "--output-dir", str(run), "--seq-len"]
    assert main(argv + ["249"]) == 2
    assert ("training on seq_len 249 with k=3, A=3 after a 2-token thought_prefix needs position ids up to 257, "
            "but LlamaForCausalLM has 256 positions") in capsys.readouterr().err
    assert not run.exists()
    with pytest.raises(ValueError, match="a training step on 248 tokens needs position ids up to 256"):
        make_model("llama", thought_prefix="Q:")(random_text(1, 248))  # the exact check: 247 is the longest
    assert main(argv + ["247"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_training_past_the_positions_runs_when_opted_in(tmp_path):
    from quietstar.training.recipe import TrainConfig, train

    folder = _plain_folder(tmp_path / "llama", max_position_embeddings=24)
    settings = dict(model=str(folder), output_dir=str(tmp_path / "run"), seq_len=20, batch_size=1, max_steps=1,
                    eval_every=0, sample_every=0, num_documents=20,
                    quietstar={"sampled_thought_tokens": 2, "ahead_tokens": 2})
    with pytest.raises(ValueError, match="needs position ids up to 24, but LlamaForCausalLM has 24 positions"):
        train(TrainConfig.from_dict(settings))
    assert not (tmp_path / "run").exists()
    settings["quietstar"]["allow_position_extrapolation"] = True
    result = train(TrainConfig.from_dict(settings))
    assert result.step == 1 and torch.isfinite(torch.tensor(result.metrics["loss"]))


def test_generate_refuses_max_new_tokens_past_the_positions_before_loading(tmp_path, capsys):
    from quietstar.cli.generate import main

    folder = _plain_folder(tmp_path / "llama", weights=False)
    assert main(["--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quietstar generate: error: generating 1000 tokens needs position ids up to 1010, "
                          "but LlamaForCausalLM has 256 positions"), err  # k = 9: the plain model's default
    assert main(["--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1000", "--thought-tokens", "0"]) == 2
    assert "generating 1000 tokens needs position ids up to 999" in capsys.readouterr().err
    # opted in, the check passes and the missing weights stop it, at loading
    assert main(["--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1000",
                 "--allow-position-extrapolation"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_generate_past_the_positions_when_opted_in(tmp_path, capsys):
    from quietstar.cli.generate import main

    folder = _plain_folder(tmp_path / "llama", max_position_embeddings=16)
    argv = ["--model", str(folder), "--prompt", "48 + 24", "--max-new-tokens", "20", "--thought-tokens", "1"]
    assert main(argv) == 2
    assert "generating 20 tokens needs position ids" in capsys.readouterr().err
    assert main(argv + ["--allow-position-extrapolation"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_saved_model_that_allows_extrapolation_generates_past_its_positions(tmp_path, capsys):
    from quietstar import QuietStarForCausalLM
    from quietstar.cli.generate import main

    lm = make_lm("llama")
    lm.config.max_position_embeddings = 16
    QuietStarForCausalLM.from_base(lm, make_tokenizer(), QuietStarConfig(
        sampled_thought_tokens=1, allow_position_extrapolation=True)).save_pretrained(tmp_path / "qs")
    argv = ["--model", str(tmp_path / "qs"), "--prompt", "48 + 24", "--max-new-tokens", "20"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--no-allow-position-extrapolation"]) == 2
    assert "generating 20 tokens needs position ids up to 22" in capsys.readouterr().err


def test_generate_counts_the_thought_prefix_before_loading(tmp_path, capsys, monkeypatch):
    """The early check counts the thought_prefix's tokens (read with the saved tokenizer, as the
    model reads them): N new tokens after a one-token prompt with k = 3 and the 2-token prefix
    "Q:" need N + k + 2 + 2 positions. N = 11 fits 16 positions without the prefix and not with
    it: refused before the weights load, naming both numbers; N = 9 fits exactly and generates,
    where generate's own check with the real prompt agrees."""
    from quietstar import QuietStarForCausalLM
    from quietstar.cli import common
    from quietstar.cli.generate import main

    lm = make_lm("llama")
    lm.config.max_position_embeddings = 16
    config = QuietStarConfig(objective="rlp", sampled_thought_tokens=3, thought_prefix="Q:")
    model = QuietStarForCausalLM.from_base(lm, make_tokenizer(), config)
    assert len(model.thought_prefix_ids) == 2
    model.save_pretrained(tmp_path / "qs")
    argv = ["--model", str(tmp_path / "qs"), "--prompt", "48", "--max-new-tokens"]

    def no_loading(*args, **kwargs):
        raise AssertionError("the check must come before the model loads")

    with monkeypatch.context() as patch:
        patch.setattr(common, "load_quietstar_model", no_loading)
        assert main(argv + ["11"]) == 2
    assert capsys.readouterr().err.startswith(
        "quietstar generate: error: generating 11 tokens (thoughts of 3 tokens after a 2-token thought_prefix) "
        "needs position ids up to 17, but LlamaForCausalLM has 16 positions")
    assert main(argv + ["9"]) == 0
    capsys.readouterr()
    with pytest.raises(Exception, match="needs position ids up to 16, but"):  # the exact check agrees
        model.generate(torch.tensor([[280, 21]]), max_new_tokens=9)


def test_the_early_tokenizer_of_a_hub_repo_comes_from_the_cache_offline(tmp_path, monkeypatch):
    """read_quietstar_tokenizer reads a Hub repo's tokenizer from its cached text files (no
    weights needed); one not in the cache gives None (the check then counts no prefix and
    loading says what is missing)."""
    from quietstar.models.loading import read_quietstar_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--owner--thinker"
    make_tokenizer().save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    tokenizer = read_quietstar_tokenizer("owner/thinker", cache_dir=tmp_path)
    assert QuietStarConfig(thought_prefix="Q:").thought_prefix_ids(tokenizer) == (50, 27)
    assert read_quietstar_tokenizer("owner/absent", cache_dir=tmp_path) is None


# ------------------------------------------------------------------------------------------ memory
def big_llama(**kwargs):
    settings = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072)
    return transformers.LlamaConfig(**{**settings, **kwargs})


def test_training_memory_is_a_stated_lower_bound():
    config = QuietStarConfig(sampled_thought_tokens=4, ahead_tokens=4, thoughts_per_position=2)  # F = 10
    lm = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2)
    need = limits.training_memory(lm, config, seq_len=32, micro_batch_size=3, bytes_per_value=4,
                                  activation_checkpointing=False)
    rows = 3 * 2 * 10 * 32
    assert need == rows * 64 * 2 * limits.VALUES_PER_LAYER * 4 + 256 * 1000 * 4
    checkpointed = limits.training_memory(lm, config, seq_len=32, micro_batch_size=3, bytes_per_value=2,
                                          activation_checkpointing=True)
    assert checkpointed == rows * 64 * 2 * 1 * 2 + 256 * 1000 * 2
    # a quarter of the positions think: the text pass at all 32, the other 9 passes at 8
    quarter = QuietStarConfig(sampled_thought_tokens=4, ahead_tokens=4, thought_fraction=0.25)
    assert limits.training_memory(lm, quarter, seq_len=32, micro_batch_size=1, bytes_per_value=4,
                                  activation_checkpointing=False) == \
        2 * (32 + 9 * 8) * 64 * 2 * 8 * 4 + 256 * 1000 * 4
    # no chunking: every base and mixed prediction's logits are kept
    whole = QuietStarConfig(sampled_thought_tokens=4, ahead_tokens=4, loss_chunk_tokens=0)
    assert limits.training_memory(lm, whole, seq_len=32, micro_batch_size=1, bytes_per_value=4,
                                  activation_checkpointing=False) == \
        2 * 10 * 32 * 64 * 2 * 8 * 4 + 2 * (32 + 32 * 4) * 1000 * 4


def test_training_memory_refuses_with_the_numbers_and_the_fix(monkeypatch):
    config = QuietStarConfig()
    cpu = torch.device("cpu")
    monkeypatch.setattr(limits, "available_memory", lambda device: (64 * limits.GIB, "test"))
    limits.check_training_memory(big_llama(), config, seq_len=64, micro_batch_size=1, device=cpu, bf16=True,
                                 activation_checkpointing=False)  # 18.8 GiB: fits
    with pytest.raises(ValueError) as refused:
        limits.check_training_memory(big_llama(), config, seq_len=8192, micro_batch_size=1, device=cpu,
                                     bf16=True, activation_checkpointing=False)
    message = str(refused.value)
    assert "a training step on seq_len 8192 with micro_batch_size 1, n=2 thoughts and F=15 passes" in message
    assert "keeps at least 2400.1 GiB of activations" in message and "only 64.0 GiB is available (test)" in message
    assert "hidden size 8192 x 80 layers x 8 values x 2 bytes" in message
    assert "--activation-checkpointing" in message
    with pytest.raises(ValueError, match="a 1/4 share"):
        limits.check_training_memory(big_llama(), config, seq_len=2048, micro_batch_size=1, device=cpu,
                                     bf16=False, activation_checkpointing=True, processes_sharing=4)
    monkeypatch.setattr(limits, "available_memory", lambda device: None)  # unknown: not checked
    limits.check_training_memory(big_llama(), config, seq_len=8192, micro_batch_size=1, device=cpu, bf16=True,
                                 activation_checkpointing=False)


LINUX = pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="the CPU's free memory is read on Linux")


@LINUX
def test_available_memory_reads_this_machine():
    free, source = limits.available_memory(torch.device("cpu"))
    assert free > 0 and source == "MemAvailable in /proc/meminfo"


@LINUX
def test_training_refuses_what_cannot_fit_in_memory_before_the_model_loads(tmp_path, capsys):
    from quietstar.cli.train import main

    folder = tmp_path / "big"
    folder.mkdir()
    big_llama().save_pretrained(folder)  # its config alone: the model is never built
    make_tokenizer().save_pretrained(folder)
    assert main(["--model", str(folder), "--seq-len", "100000", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("quietstar train: error: a training step on seq_len 100000 with micro_batch_size 1")
    assert "GiB of activations" in err and "GiB is available" in err  # on this machine's CPU or GPU
    assert not (tmp_path / "run").exists()
