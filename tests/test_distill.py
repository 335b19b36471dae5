"""Distillation (``quietstar distill``): the chunked KL against a hand-written full-vocabulary one,
the teacher's next-token states against ``think``, exact resume, and the exported folder loaded
by transformers alone (no quietstar importable), one decoder call per generated token."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import distill_config, exported_weights, make_model, random_text, thinking_teacher
from quietstar.method.distillation import distillation_kl
from quietstar.training.distill import DistillRecipe, distill
from quietstar.training.distill_config import EXPORT_DIR


@pytest.mark.parametrize("family, chunk, temperature", [("llama", 5, 1.0), ("llama", 0, 2.0), ("gemma2", 4, 0.7)])
def test_chunked_kl_equals_full_vocabulary_kl(family, chunk, temperature):
    """Value and gradients (student hidden states and head) equal T^2 KL written on full logits;
    the teacher's meta tokens (masked) add nothing, the unmasked student's rows there count."""
    teacher, student = make_model(family, seed=0), make_model(family, seed=1, loss_chunk_tokens=chunk)
    t_head, s_head = teacher.vocab_head(), student.vocab_head().unmasked()
    g = torch.Generator().manual_seed(0)
    h_t = torch.randn(3, 7, 32, generator=g)
    h = torch.randn(3, 7, 32, generator=g, requires_grad=True)
    kl = distillation_kl(s_head, h, t_head, h_t, temperature)
    kl.sum().backward()
    grads = (h.grad.clone(), student.lm.get_output_embeddings().weight.grad.clone())
    h.grad = None
    student.zero_grad()

    h_ref = h.detach().clone().requires_grad_(True)
    p = torch.softmax(teacher.logits(h_t) / temperature, -1)        # meta ids at -inf: p = 0
    logq = torch.log_softmax(student.lm.get_output_embeddings()(h_ref).float() / temperature
                             if family != "gemma2" else s_head.logits(h_ref) / temperature, -1)
    terms = torch.where(p > 0, p * (p.log() - logq), torch.zeros_like(p))
    ref = terms.sum(-1) * temperature ** 2
    ref.sum().backward()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], h_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], student.lm.get_output_embeddings().weight.grad, rtol=1e-4, atol=1e-6)
    assert (kl >= -1e-6).all()


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_teacher_states_are_thinks_mixed_prediction(fraction):
    """next_token_hidden through the head = think's mixed logits of x_{i+1} (base where no thought)."""
    model = thinking_teacher()
    ids = random_text(2, 9)
    hidden = model.next_token_hidden(ids, generator=torch.Generator().manual_seed(3), thought_fraction=fraction)
    _, scores = model.think(ids, generator=torch.Generator().manual_seed(3), thought_fraction=fraction, steps=1)
    torch.testing.assert_close(model.logits(hidden), scores.mixed_logits[:, :, 0], rtol=1e-5, atol=1e-5)
    if fraction < 1:
        off = ~scores.thought_positions
        assert off.any()
        torch.testing.assert_close(model.logits(hidden)[off], scores.base_logits[off], rtol=1e-5, atol=1e-5)


def test_resume_is_exact_and_training_moves_towards_the_teacher(teacher_dir, tmp_path):
    whole = distill(distill_config(teacher_dir, tmp_path / "whole", next_token_loss_weight=0.5))
    first = distill(distill_config(teacher_dir, tmp_path / "split", next_token_loss_weight=0.5, max_steps=1))
    assert first.step == 1
    rest = distill(replace(distill_config(teacher_dir, tmp_path / "split", next_token_loss_weight=0.5),
                           resume="latest"))
    assert rest.step == 3 and rest.metrics == {**whole.metrics, "step_time_s": rest.metrics["step_time_s"]}
    a, b = exported_weights(tmp_path / "whole"), exported_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["kl"] < records[0]["kl"]  # lr 1e-2 on a tiny model: the KL falls in 3 steps


def test_max_steps_0_exports_the_teachers_lm(teacher_dir, tmp_path):
    result = distill(distill_config(teacher_dir, tmp_path / "run", max_steps=0))
    assert result.checkpoint is None and result.step == 0
    teacher = load_file(teacher_dir / "model.safetensors")
    exported = exported_weights(tmp_path / "run")
    assert teacher.keys() == exported.keys() and all(torch.equal(teacher[k], exported[k]) for k in teacher)
    assert "quietstar_head.safetensors" not in {p.name for p in result.model_dir.iterdir()}
    assert "quietstar distill --max-steps 0" in (result.model_dir / "README.md").read_text()


PLAIN_LOAD = r"""
import json, sys
sys.modules["quietstar"] = None  # whatever site-packages holds: not importable here
try:
    import quietstar
except ImportError:
    pass
else:
    raise SystemExit("quietstar is importable")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, new = sys.argv[1], int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
calls = []
model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
ids = tok("48 + 24 = 72 clips in April", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0].tolist()
    calls.clear()
    out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"vocab": sorted(tok.get_vocab()), "size": len(tok), "prompt": ids[0].tolist(),
                  "logits": logits, "generated": out[0, ids.shape[1]:].tolist(), "calls": len(calls)}))
"""


def test_export_loads_with_transformers_alone(teacher_dir, tmp_path):
    """No meta token in the tokenizer; the model's logits are the student LM's; generate makes one
    decoder call per new token and equals greedy decoding with the student's plain forward."""
    recipe = DistillRecipe(distill_config(teacher_dir, tmp_path / "run", max_steps=2))
    result = recipe.run()
    new = 6
    done = subprocess.run([sys.executable, "-I", "-c", PLAIN_LOAD, str(result.model_dir), str(new)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    meta = {recipe.teacher.config.start_thought_token, recipe.teacher.config.end_thought_token}
    assert not meta & set(seen["vocab"]) and seen["size"] == len(recipe.teacher.tokenizer) - 2
    assert seen["calls"] == new
    lm = recipe.student.lm.eval()
    ids = torch.tensor([seen["prompt"]])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(seen["logits"]), lm(ids).logits[0], rtol=1e-4, atol=1e-4)
        for _ in range(new):  # greedy, re-reading the whole text each time: no cache, no thought
            ids = torch.cat([ids, lm(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert seen["generated"] == ids[0, -new:].tolist()
    card = (result.model_dir / "README.md").read_text()
    assert f"distilled from {teacher_dir}" in card and "2 steps" in card


def test_command_line_distills_and_prints_the_folder(teacher_dir, tmp_path, capsys):
    from quietstar.cli.main import main

    code = main(["distill", "--teacher", str(teacher_dir), "--output-dir", str(tmp_path / "run"), "--seq-len", "16",
                 "--batch-size", "2", "--max-steps", "1", "--device", "cpu", "--temperature", "2"])
    assert code == 0
    assert f"the plain model: {tmp_path / 'run' / EXPORT_DIR}" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint-000001" / "distill_config.yaml").is_file()
    assert "temperature 2.0" in (tmp_path / "run" / EXPORT_DIR / "README.md").read_text()
