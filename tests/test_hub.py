"""quietstar.utils.hub: one rule for "offline" and one for "is this a Hub id", used by every loader."""

from __future__ import annotations

import pytest

from quietstar.utils.hub import OFFLINE_VARIABLES, is_hub_id, offline


@pytest.fixture
def no_offline_env(monkeypatch):
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_offline_is_either_variable_set_to_a_true_spelling(no_offline_env):
    monkeypatch = no_offline_env
    assert not offline()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        for value in ("1", "true", "TRUE", "yes", "On", " 1 "):
            monkeypatch.setenv(name, value)
            assert offline(), (name, value)
        for value in ("0", "false", "no", "off", ""):
            monkeypatch.setenv(name, value)
            assert not offline(), (name, value)
        monkeypatch.delenv(name)
    # The union: one variable set is enough, whatever the other says.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert offline()


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M", "me/thinking-llama",
                                  "someone/plain_lm.v2", "openai/gsm8k"])
def test_hub_ids_are_names_or_owner_slash_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id(name)


@pytest.mark.parametrize("name", [
    "./nope", "../up", "~/models/x", "/abs/path", "a/b/c", "dir\\model", ".hidden",
    "", "my model", "owner/", "/name", "a--b", "a..b", "owner/repo.git", "-a/b", "x" * 97,
    "embedded:smollm2-135m-instruct", "someorg/gsm:main",
])
def test_path_syntax_and_what_the_hub_refuses_are_not_hub_ids(name):
    assert not is_hub_id(name)


def test_an_existing_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("owner/model") and is_hub_id("notes")
    (tmp_path / "owner" / "model").mkdir(parents=True)
    (tmp_path / "notes").write_text("a file")
    assert not is_hub_id("owner/model") and not is_hub_id("notes")
    assert not is_hub_id(None) and not is_hub_id(tmp_path)  # a Path object means a path
