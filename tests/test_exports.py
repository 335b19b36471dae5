"""The package's public names: the config and the input error at import; the model's, the training
and the loading ones (torch, transformers) on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import quietstar

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers.trainer", "quietstar.training.recipe", "quietstar.training.hf_trainer", "trl")


def test_import_quietstar_leaves_the_training_stack_unimported_until_a_name_is_used():
    # A fresh interpreter: this one's test modules have imported training long ago.
    code = (
        "import json, sys, quietstar\n"
        "assert quietstar.__file__.startswith(sys.argv[1]), quietstar.__file__\n"
        f"heavy = {HEAVY!r}\n"
        "before = [m for m in heavy if m in sys.modules]\n"
        "trainer = quietstar.QuietStarTrainer\n"
        "after = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps({'before': before, 'after': after, 'module': trainer.__module__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] == []
    assert "transformers.trainer" in seen["after"] and seen["module"] == "quietstar.training.hf_trainer"


def test_each_lazy_name_is_the_object_of_its_module():
    from quietstar.models.loading import load_base_model, load_quietstar_model
    from quietstar.models.modeling import NonFiniteLossError, QuietStarForCausalLM, QuietStarOutput, ThoughtScores
    from quietstar.training.config import TrainConfig
    from quietstar.training.hf_trainer import QuietStarTrainer, QuietStarTrainingArguments
    from quietstar.training.recipe import TrainResult, train

    expected = {"QuietStarTrainer": QuietStarTrainer, "QuietStarTrainingArguments": QuietStarTrainingArguments,
                "TrainConfig": TrainConfig, "train": train, "TrainResult": TrainResult,
                "load_base_model": load_base_model, "load_quietstar_model": load_quietstar_model,
                "QuietStarForCausalLM": QuietStarForCausalLM, "QuietStarOutput": QuietStarOutput,
                "ThoughtScores": ThoughtScores, "NonFiniteLossError": NonFiniteLossError}
    for name, obj in expected.items():
        assert getattr(quietstar, name) is obj, name
    namespace: dict = {}
    exec("from quietstar import *", namespace)
    assert all(namespace[name] is getattr(quietstar, name) for name in quietstar.__all__)
    assert set(expected) | {"QuietStarForCausalLM", "QuietStarConfig"} <= set(quietstar.__all__)
    assert set(quietstar.__all__) <= set(dir(quietstar))
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        quietstar.nothing_here  # noqa: B018
