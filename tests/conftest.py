"""Tiny models and a tiny tokenizer, built locally (no hub)."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.training.distill_config import EXPORT_DIR, DistillConfig

torch.set_num_threads(1)  # steadier on a shared 2-core machine
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`make test`: one worker per core) the processes a test starts (the CLI,
    # torchrun, accelerate launch) get one thread too, so a worker never uses more than its core.
    os.environ["OMP_NUM_THREADS"] = "1"

pytest_plugins = ["pytester", "ci_skips"]

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 + 24 = 72 --- #### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) ? ! , . : ;",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<eos>", pad_token="<pad>" if pad else None)
    return tok


TOKENIZER_SIZE = 320  # the tiny BPE tokenizer's size (its trainer's vocab_size)
VOCAB = 336  # >= tokenizer size + 2 meta tokens would also work; meta ids may exceed the matrix

FAMILIES = {
    # GQA (4 query heads share 2 key/value heads)
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False),
    # sliding window smaller than the sequence
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, sliding_window=7),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256),
    # embedding scaling by sqrt(d), tied embeddings
    "gemma": lambda: transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256),
    # attention and final-logit softcapping, alternating sliding-window layers
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        sliding_window=6, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    # learned absolute positions
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def make_lm(family: str = "llama", seed: int = 0, vocab_size: int | None = None):
    """A tiny random LM. ``vocab_size=TOKENIZER_SIZE`` puts the meta tokens that ``from_base``
    adds beyond the LM head, as in every real model (the default VOCAB leaves room for them)."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    if vocab_size is not None:
        config.vocab_size = vocab_size
    config._attn_implementation = "eager"
    lm = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    lm.eval()
    return lm


def make_model(family: str = "llama", seed: int = 0, vocab_size: int | None = None,
               **config_kwargs) -> QuietStarForCausalLM:
    config = QuietStarConfig(**{"sampled_thought_tokens": 3, "ahead_tokens": 3, **config_kwargs})
    return QuietStarForCausalLM.from_base(make_lm(family, seed, vocab_size), make_tokenizer(), config)


def random_text(batch: int, length: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and tokenizer saved like a Hugging Face checkpoint (read-only for tests)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_lm("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def thinking_teacher(family: str = "llama", seed: int = 0):
    """A tiny QuietStar model whose mixing head is not at w = 0, so its thoughts change its prediction."""
    model = make_model(family, seed=seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.mixing_head.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """``thinking_teacher()`` (k = 3) saved once, the teacher of the distillation tests (read-only)."""
    path = tmp_path_factory.mktemp("teacher") / "model"
    thinking_teacher().save_pretrained(path)
    return path


def distill_config(teacher_dir, out, **kw) -> DistillConfig:
    """A tiny CPU distillation run of 3 steps from ``teacher_dir`` into ``out``; ``kw`` overrides."""
    settings = dict(seq_len=16, batch_size=2, max_steps=3, learning_rate=1e-2, checkpoint_every=1,
                    keep_checkpoints=5, device="cpu")
    return DistillConfig(teacher=str(teacher_dir), output_dir=str(out), **(settings | kw))


def exported_weights(run_folder) -> dict[str, torch.Tensor]:
    """The weights of a distillation run's exported plain model."""
    return load_file(run_folder / EXPORT_DIR / "model.safetensors")


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def load_script(relative_path: str):
    """A script of the repository (benchmarks/, examples/, experiments/: not packages) as a module."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    # As `python <script>` runs it: its own folder first on sys.path, for its sibling imports.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
