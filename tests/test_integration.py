"""The core on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import make_model
from quietstar import QuietStarConfig, QuietStarForCausalLM

# One pytest-xdist worker for the file (`make test`: --dist loadgroup): it loads SmolLM2 once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("smollm2")]


@pytest.fixture(scope="module")
def smollm():
    from quietstar.models.loading import EMBEDDED_MODEL, load_base_model

    lm, tokenizer = load_base_model(EMBEDDED_MODEL)
    reference = load_base_model(EMBEDDED_MODEL)[0]
    config = QuietStarConfig(sampled_thought_tokens=4, ahead_tokens=3)
    return QuietStarForCausalLM.from_base(lm, tokenizer, config), reference


def test_parallel_equals_sequential_on_smollm2(smollm):
    model, reference = smollm
    text = "Natalia sold 48 clips in April and half as many in May."
    x = model.tokenizer(text, return_tensors="pt").input_ids
    L = x.shape[1]
    thoughts = model.sample_thoughts(x, generator=torch.Generator().manual_seed(0))
    scores = model.score_thoughts(x, thoughts)
    emb = model.get_input_embeddings()
    for i in (0, L // 2, L - 3):
        seq = torch.cat([x[0, :i + 1], torch.tensor([model.start_id]), thoughts[0, i],
                         torch.tensor([model.end_id]), x[0, i + 1:i + 3]])
        with torch.no_grad():
            logits = reference(inputs_embeds=emb(seq[None])).logits[0]
        end = i + 1 + 4 + 1
        for s in range(3):
            torch.testing.assert_close(scores.thought_logits[0, i, s], logits[end + s], atol=1e-4, rtol=0)
    # The meta tokens are new special tokens, encoded as one token each.
    assert model.tokenizer("<|startofthought|>", add_special_tokens=False).input_ids == [model.start_id]


def test_training_step_on_smollm2(smollm):
    model, _ = smollm
    x = model.tokenizer(["Weng earns $12 an hour for babysitting. She did 50 minutes."],
                        return_tensors="pt").input_ids
    out = model(x, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.thought_ids.shape == (1, 2, x.shape[1], 4)
    assert model.mixing_head.mlp[-1].weight.grad.abs().sum() > 0
    model.zero_grad()


def test_the_readmes_python_loading_snippet_runs(tmp_path, monkeypatch):
    """The README's snippet that loads the embedded model from Python runs as written (its last
    line reads the folder the README's first snippet saves: here a tiny saved model)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                 if "embedded:smollm2-135m-instruct" in block and "load_quietstar_model" in block]
    make_model().save_pretrained(tmp_path / "my-thinking-model")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(snippet, "README.md", "exec"), names)
    lm, tok, model, trained = names["lm"], names["tok"], names["model"], names["trained"]
    assert lm.config.num_hidden_layers == 30 and len(tok) == 49152 + 2  # SmolLM2, plus START/END
    assert isinstance(model, QuietStarForCausalLM) and model.config == QuietStarConfig()
    assert model.lm.config.num_hidden_layers == 30 and model.lm is not lm
    assert isinstance(trained, QuietStarForCausalLM) and trained.lm.config.num_hidden_layers != 30
    x = model.tokenizer(["Natalia sold 48 clips in April."], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
