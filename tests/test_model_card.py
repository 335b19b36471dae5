"""The model card save_pretrained writes, and push_to_hub up to the network boundary."""

from __future__ import annotations

import yaml
from transformers import AutoModelForCausalLM

from conftest import make_model
from quietstar import QuietStarForCausalLM
from quietstar.models.model_card import TrainingFacts, render_card


def header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_save_pretrained_writes_a_card_the_hub_reads(tmp_path):
    model = make_model()
    model.lm.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    meta = header(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "quietstar"
    assert "not trained yet" in card and "| `sampled_thought_tokens` | 3 |" in card
    assert "QuietStarForCausalLM.from_pretrained" in card and "AutoModelForCausalLM" in card
    # What the card says about a plain load: the base LM, with the two extra tokens in the tokenizer.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(plain).__name__ == type(model.lm).__name__
    assert QuietStarForCausalLM.from_pretrained(tmp_path).config == model.config


def test_card_with_training_facts():
    facts = TrainingFacts(data="openai/gsm8k", steps=200, tokens_per_step=256,
                          heldout={"eval/nll_without_thought": 3.9, "eval/nll_with_thought": 3.8},
                          samples=["…Natalia sold «48 clips» 24"])
    card = render_card(make_model(), facts)
    assert header(card)["datasets"] == ["openai/gsm8k"]
    assert "- optimiser steps: 200 of 256 tokens" in card and "| nll_with_thought | 3.8000 |" in card
    assert "- …Natalia sold «48 clips» 24" in card and "not trained yet" not in card
    assert "datasets" not in header(render_card(make_model(), TrainingFacts("builtin:arithmetic", 1, 32)))


def test_push_to_hub_creates_the_repo_and_uploads_a_saved_model(monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls.append(("create", repo_id, private, exist_ok, repo_type))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
            from pathlib import Path
            files = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload", repo_id, files, commit_message))

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = make_model().push_to_hub("me/thinking-llama", private=True, token="t")
    assert url == "https://huggingface.co/me/thinking-llama"
    assert calls[0] == ("token", "t") and calls[1] == ("create", "me/thinking-llama", True, True, "model")
    _, repo, files, message = calls[2]
    assert repo == "me/thinking-llama" and message == "Upload Quiet-STaR model"
    for name in ("README.md", "config.json", "model.safetensors", "quietstar_config.json",
                 "quietstar_head.safetensors", "tokenizer.json", "quietstar_tokenizer_check.json"):
        assert name in files, name


def fake_hub_cache(cache, repo_id, saved_folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub keeps in its cache: refs/main -> snapshots/<commit>/files."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(saved_folder, repo / "snapshots" / commit)


def test_from_pretrained_asks_the_hub_for_hub_ids_only_and_offline_from_either_switch(tmp_path, monkeypatch):
    import huggingface_hub
    import pytest
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def snapshot_download(name, **kwargs):
        asked.append((name, kwargs["local_files_only"]))
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    for switches, offline in [({}, False), ({"HF_HUB_OFFLINE": "1"}, True),
                              ({"TRANSFORMERS_OFFLINE": "yes"}, True)]:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in switches.items():
            monkeypatch.setenv(name, value)
        for repo in ("me/not-there", "not-there"):  # a bare id is a Hub id too, as on the Hub
            with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
                QuietStarForCausalLM.from_pretrained(repo)
            assert asked.pop() == (repo, offline)
    for path in ("a/b/c", "./missing", "~/missing", "my model"):
        with pytest.raises(FileNotFoundError, match="neither a saved QuietStar model folder nor a Hub repo id"):
            QuietStarForCausalLM.from_pretrained(path)
    assert not asked


def test_a_cached_hub_model_loads_offline_with_the_usual_arguments(tmp_path, monkeypatch):
    import torch

    model = make_model()
    model.save_pretrained(tmp_path / "saved")
    fake_hub_cache(tmp_path / "cache", "me/thinking-llama", tmp_path / "saved")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = QuietStarForCausalLM.from_pretrained("me/thinking-llama", cache_dir=tmp_path / "cache",
                                                  torch_dtype=torch.bfloat16)
    assert loaded.lm.dtype == torch.bfloat16
    for key, value in model.state_dict().items():  # the LM in bf16; the head keeps its fp32
        head = key == "embedding.scaled_vectors" or key.startswith("mixing_head.")
        expected = value if head else value.to(torch.bfloat16).float()
        assert torch.equal(loaded.state_dict()[key].float(), expected), key
    import pytest

    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        QuietStarForCausalLM.from_pretrained("me/not-there", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="neither a saved QuietStar model folder nor a Hub repo id"):
        QuietStarForCausalLM.from_pretrained(tmp_path / "missing")


def test_training_writes_its_facts_into_the_card_and_pushes_the_last_model(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    from quietstar.training.recipe import TrainConfig, train

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def whoami(self, token=None, **kwargs):  # the check before the run
            return {"name": "me", "auth": {"accessToken": {"role": "write"}}}

        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            from pathlib import Path
            uploads.append((repo_id, Path(folder_path), (Path(folder_path) / "README.md").read_text()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("quietstar.training.recipe.plot_training_curves", lambda *args: None)
    config = TrainConfig.from_dict(dict(
        model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), seq_len=16, max_steps=2,
        eval_every=2, eval_batches=1, eval_documents=5, sample_every=1, num_documents=40,
        push_to_hub="me/tiny-thinker", quietstar={"sampled_thought_tokens": 2, "ahead_tokens": 2}))
    result = train(config)
    card = (result.checkpoint / "model" / "README.md").read_text()
    assert "- data: `builtin:arithmetic`" in card and "- optimiser steps: 2 of 16 tokens" in card
    assert "| nll_with_thought |" in card and "«" in card
    assert uploads == [("me/tiny-thinker", result.checkpoint / "model", card)]
    assert result.pushed_to == "https://huggingface.co/me/tiny-thinker"
    import pytest

    with pytest.raises(ValueError, match="push_to_hub must be a Hub repo id 'owner/name'"):
        TrainConfig(push_to_hub="not a repo")
