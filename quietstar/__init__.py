"""quietstar: Quiet-STaR for any Hugging Face causal LM."""

from quietstar.utils.log_filters import drop_deepspeed_cpu_notice

drop_deepspeed_cpu_notice()  # before anything imports DeepSpeed (see quietstar/utils/log_filters.py)

from quietstar.method.config import QuietStarConfig  # noqa: E402
from quietstar.utils.errors import QuietStarInputError  # noqa: E402

# Imported on first use (the module's __getattr__): the model's names bring torch and transformers,
# which importing any quietstar module (every command's `--help` does) must not pay for; the
# training names bring transformers.Trainer and the training recipe with its accelerate set-up,
# which using a model needs none of.
_LAZY_EXPORTS = {
    "QuietStarForCausalLM": "quietstar.models.modeling",
    "QuietStarOutput": "quietstar.models.modeling",
    "ThoughtScores": "quietstar.models.modeling",
    "NonFiniteLossError": "quietstar.models.modeling",
    "QuietStarTrainer": "quietstar.training.hf_trainer",
    "QuietStarTrainingArguments": "quietstar.training.hf_trainer",
    "TrainConfig": "quietstar.training.config",
    "train": "quietstar.training.recipe",
    "TrainResult": "quietstar.training.recipe",
    "load_base_model": "quietstar.models.loading",
    "load_quietstar_model": "quietstar.models.loading",
}

__all__ = ["QuietStarConfig", "QuietStarInputError", *_LAZY_EXPORTS]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module 'quietstar' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
