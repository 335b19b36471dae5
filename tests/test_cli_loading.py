"""The model-loading flags of the commands that take --model (``LoadingArguments``): --dtype,
--revision, --cache-dir and --device-map reach the loader with transformers' meaning, and a Hub
id in a local cache loads offline."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_lm, make_model, make_tokenizer
from quietstar.cli import main as cli
from quietstar.utils.errors import QuietStarInputError

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def loaded(monkeypatch, tmp_path):
    """Runs ``quietstar inspect`` up to the page and returns the model it loaded."""
    seen = []

    def page(model, text, out, *args, title=None, **kwargs):
        seen.append((model, title))
        return Path(out)

    monkeypatch.setattr("quietstar.evaluation.viewer.write_page", page)  # run() imports it

    def run(*argv: str):
        assert cli.main(["inspect", "--text", "hi there", "--out", str(tmp_path / "page.html"), *argv]) == 0
        return seen[-1]

    return run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "my-model"
    make_model().save_pretrained(path)
    return path


def fake_hub_cache(root: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """The Hugging Face hub cache layout (models--owner--name/snapshots/<commit>, refs/<name>)
    holding ``snapshots`` (commit -> a saved folder), as a download would leave it."""
    folder = root / ("models--" + repo.replace("/", "--"))
    for commit, source in snapshots.items():
        shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (folder / "refs" / ref).write_text(commit)
    return root


def test_dtype_gives_parameters_of_that_dtype(loaded, saved, tiny_model_dir):
    for model_dir in (saved, tiny_model_dir):  # a saved QuietStar model and a plain one
        model, _ = loaded("--model", str(model_dir), "--dtype", "bf16")
        assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}
        model, _ = loaded("--model", str(model_dir))
        assert {p.dtype for p in model.lm.parameters()} == {torch.float32}


def test_device_map_reaches_transformers(loaded, saved, tiny_model_dir, monkeypatch):
    pytest.importorskip("accelerate")
    import transformers

    original, given = transformers.AutoModelForCausalLM.from_pretrained, []

    def recording(*args, **kwargs):
        given.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    for model_dir in (saved, tiny_model_dir):  # a saved QuietStar model and a plain one
        model, _ = loaded("--model", str(model_dir), "--device-map", "cpu")
        assert given[-1] == "cpu"
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    loaded("--model", str(saved))
    assert given[-1] is None


def test_a_hub_id_in_a_local_cache_loads_offline_at_its_revision(loaded, tmp_path, monkeypatch):
    """--cache-dir and --revision reach the Hub lookup: two snapshots of one QuietStar repo,
    told apart by their thought length; main is A, the commit B and the tag v2 are B."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_model(sampled_thought_tokens=3).save_pretrained(tmp_path / "a")
    make_model(sampled_thought_tokens=5).save_pretrained(tmp_path / "b")
    cache = fake_hub_cache(tmp_path / "hub", "someone/thinker", {COMMIT_A: tmp_path / "a", COMMIT_B: tmp_path / "b"},
                           {"main": COMMIT_A, "v2": COMMIT_B})
    base = ["--model", "someone/thinker", "--cache-dir", str(cache)]
    model, title = loaded(*base)
    assert model.config.sampled_thought_tokens == 3
    assert title == "Quiet-STaR thoughts of someone/thinker"
    assert loaded(*base, "--revision", COMMIT_B)[0].config.sampled_thought_tokens == 5
    assert loaded(*base, "--revision", "v2")[0].config.sampled_thought_tokens == 5


def test_a_plain_hub_model_in_a_local_cache_loads_offline(loaded, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_lm().save_pretrained(tmp_path / "lm")
    make_tokenizer().save_pretrained(tmp_path / "lm")
    cache = fake_hub_cache(tmp_path / "hub", "someone/plain-lm", {COMMIT_A: tmp_path / "lm"}, {"main": COMMIT_A})
    model, _ = loaded("--model", "someone/plain-lm", "--cache-dir", str(cache), "--dtype", "bfloat16")
    assert model.lm.dtype == torch.bfloat16
    assert "is a plain base model" in capsys.readouterr().err
    # not in that cache (the default one is not looked at): a clear error, offline
    assert cli.main(["inspect", "--text", "hi", "--model", "someone/plain-lm", "--cache-dir",
                     str(tmp_path / "empty-cache"), "--out", str(tmp_path / "page.html")]) == 2
    assert "could not be loaded in the local Hugging Face cache (offline mode)" in capsys.readouterr().err


def test_generate_and_analyze_take_the_loading_flags(monkeypatch, saved, tmp_path, capsys):
    """Every command with --model passes the flags on (here: --dtype into generate and analyze)."""
    dtypes = []

    def spy(model, *args, **kwargs):
        dtypes.append(model.lm.dtype)
        raise QuietStarInputError("stop here")

    monkeypatch.setattr("quietstar.method.generation.generate", spy)  # the commands' run() imports them
    monkeypatch.setattr("quietstar.evaluation.analysis.token_nlls", spy)
    assert cli.main(["generate", "--model", str(saved), "--prompt", "hi", "--dtype", "float16"]) == 2
    data = tmp_path / "d.txt"
    data.write_text("some text to analyse here")
    assert cli.main(["analyze", "--model", str(saved), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--dtype", "bfloat16"]) == 2
    assert dtypes == [torch.float16, torch.bfloat16]


def test_the_page_title_names_the_model_not_its_path(loaded, saved, tmp_path):
    from quietstar.evaluation.viewer import model_display_name

    assert loaded("--model", str(saved))[1] == "Quiet-STaR thoughts of my-model"
    checkpoint = tmp_path / "runs" / "quietstar-20260101-120000" / "checkpoint-20" / "model"
    checkpoint.mkdir(parents=True)
    assert model_display_name(str(checkpoint)) == "quietstar-20260101-120000/checkpoint-20"
    assert model_display_name("embedded:smollm2-135m-instruct") == "embedded:smollm2-135m-instruct"
    assert model_display_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_train_reads_a_hub_id_at_its_revision_from_the_cache_dir(tmp_path, monkeypatch):
    """quietstar train's --revision and --cache-dir reach its loader (TrainConfig -> build_model)."""
    from quietstar.utils.settings import given_settings
    from quietstar.cli.train import add_arguments
    from quietstar.training.config import TrainConfig
    from quietstar.training.components import build_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, seed in (("a", 0), ("b", 1)):
        make_lm(seed=seed).save_pretrained(tmp_path / name)
        make_tokenizer().save_pretrained(tmp_path / name)
    cache = fake_hub_cache(tmp_path / "hub", "someone/lm", {COMMIT_A: tmp_path / "a", COMMIT_B: tmp_path / "b"},
                           {"main": COMMIT_A})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "someone/lm", "--cache-dir", str(cache), "--revision", COMMIT_B])
    config = TrainConfig.from_dict(given_settings(args, TrainConfig))
    weight = build_model(config).lm.get_input_embeddings().weight
    torch.testing.assert_close(weight[:300], make_lm(seed=1).get_input_embeddings().weight[:300])
    config = TrainConfig.from_dict({**config.to_dict(), "revision": None})  # main: the first snapshot
    weight = build_model(config).lm.get_input_embeddings().weight
    torch.testing.assert_close(weight[:300], make_lm(seed=0).get_input_embeddings().weight[:300])
