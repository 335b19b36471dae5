"""What each deliberate difference from the reference Quiet-STaR code changes, measured.

    python benchmarks/fidelity.py          # about two minutes on one CPU thread

docs/fidelity.md quotes its output. Models: the tests' tiny fp32 Mistral and Llama (random
weights, vocabulary 336, so the LM head has rows for START/END as the reference's resized one
has), built locally; nothing is downloaded. Sections:

1. The objective's three definitions (``policy_positions``, ``meta_tokens_in_loss``; the mixing
   head's bias changes no loss at equal weights): one training step of the tiny Mistral with a
   live mixing head (its last layer drawn at random, so thoughts change the prediction and the
   rewards differ), the same thoughts replayed under each setting; relative changes of the
   policy and total loss, and how far the policy term's gradient turns:
   |g_quietstar - g_reference| / |g_reference| over all parameters.
2. ``mixing_head_bias`` and the learned START/END in training: tiny Llama runs of ``train``
   (the cpu-demo preset's method settings, lr 1e-4, 30 steps, seeds 0-2) with and without the
   bias, on the built-in corpus; and the held-out NLL with thought of each trained model with
   its START/END reset to their initialisation, which is what the reference's re-initialisation
   on reload does.
3. fp32 master weights: the share of weights an Adam step at a given learning rate leaves
   unchanged when the weights are stored in bf16 (the reference's pure-bf16 training).
4. The reference's evaluation thoughts: its "temperature 0.001" hard Gumbel-softmax samples at
   temperature 1 (argmax(z + Gumbel noise) does not depend on the temperature).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_lm, make_tokenizer, random_text  # noqa: E402  (the tests' tiny models)

from quietstar import QuietStarConfig, QuietStarForCausalLM, TrainConfig, train  # noqa: E402

SEEDS = (0, 1, 2)  # of the training runs


def live_model(family: str, A: int, **settings) -> QuietStarForCausalLM:
    config = QuietStarConfig(sampled_thought_tokens=4, ahead_tokens=A, thoughts_per_position=2, **settings)
    model = QuietStarForCausalLM.from_base(make_lm(family), make_tokenizer(), config)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.train()


def step(model, text, thoughts):
    """(loss, metrics, policy-term gradient as one vector) of one step on replayed thoughts."""
    model.zero_grad()
    out = model(text, thought_ids=thoughts)
    out.terms["policy"].backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.loss.item(), {k: v.item() for k, v in out.metrics.items()}, grad


def objective_table() -> None:
    print("## 1. The objective: one step, the same weights and thoughts (tiny fp32 Mistral, n = 2, k = 4)\n")
    print("| L | A | B | policy loss: partial / reference | total loss | policy gradient turned "
          "| base NLL: masked - full (2/V) | mixed NLL: masked - full | mean reward: masked - full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for L, A, B in ((24, 3, 2), (32, 4, 2), (128, 4, 1)):
        text = random_text(B, L, seed=L)
        sampler = live_model("mistral", A)
        thoughts = sampler(text, generator=torch.Generator().manual_seed(0)).thought_ids
        runs = {}
        for name, positions, in_loss in (("partial", "partial", True), ("reference", "reference", True),
                                         ("masked", "reference", False)):
            runs[name] = step(live_model("mistral", A, policy_positions=positions, meta_tokens_in_loss=in_loss,
                                         mixing_head_bias=False), text, thoughts)
        (loss_p, m_p, g_p), (loss_r, m_r, g_r), (_, m_m, _) = runs["partial"], runs["reference"], runs["masked"]
        V = sampler.lm.get_output_embeddings().weight.shape[0]
        print(f"| {L} | {A} | {B} | {m_p['policy_loss'] / m_r['policy_loss']:.3f} | {loss_p / loss_r:.3f} "
              f"| {((g_p - g_r).norm() / g_r.norm()).item():.1%} "
              f"| {m_m['base_nll'] - m_r['base_nll']:+.5f} ({2 / V:.5f}) | {m_m['mixed_nll'] - m_r['mixed_nll']:+.5f} "
              f"| {m_m['mean_reward'] - m_r['mean_reward']:+.1e} |")
    print()


def training_runs(folder: Path) -> None:
    print("## 2. Training with and without the mixing head's bias; START/END reset as on the reference's reload\n")
    model_dir = folder / "tiny-llama"
    make_lm("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    settings = dict(model=str(model_dir), seq_len=32, batch_size=2, micro_batch_size=1, max_steps=30,
                    learning_rate=1e-4, warmup_steps=2, eval_every=30, sample_every=0, num_documents=200,
                    eval_documents=16, eval_batches=4, mixing_head_lr_multiplier=30,
                    quietstar={"sampled_thought_tokens": 4, "ahead_tokens": 4, "policy_loss_weight": 1.0,
                               "base_loss_weight": 1.0, "mixed_loss_weight": 1.0})
    print("| seed | mixing head | mean w (last step) | held-out NLL without thought | with thought "
          "| with START/END reset |")
    print("|---|---|---|---|---|---|")
    for seed in SEEDS:
        for bias in (True, False):
            out = folder / f"seed{seed}-bias-{bias}"
            run = {**settings, "output_dir": str(out), "seed": seed,
                   "quietstar": {**settings["quietstar"], "mixing_head_bias": bias}}
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                result = train(TrainConfig.from_dict(run))
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            last_w = [r["mean_mixing_weight"] for r in records if "mean_mixing_weight" in r][-1]
            held = [r for r in records if "eval/nll_with_thought" in r][-1]
            learned, reset = heldout_with_reset_meta_tokens(result.checkpoint / "model", out)
            assert abs(learned - held["eval/nll_with_thought"]) < 1e-4  # the reload reproduces the run's number
            print(f"| {seed} | {'bias' if bias else 'no bias (reference)'} | {last_w:+.4f} "
                  f"| {held['eval/nll_without_thought']:.4f} | {held['eval/nll_with_thought']:.4f} | {reset:.4f} |")
    print()


def heldout_with_reset_meta_tokens(model_dir: Path, run_folder: Path) -> tuple[float, float]:
    """The held-out NLL with thought of the saved model as it is (the run's own last number) and
    after START/END go back to their initialisation (the embedding of meta_token_init's first
    token), as the reference's first forward of a reloaded model does: the same held-out batches
    and thought generators, as the recipe evaluates (eval mode, no gradients)."""
    from quietstar.training.components import HeldoutLoss, build_data

    model = QuietStarForCausalLM.from_pretrained(model_dir).eval()
    config = TrainConfig.from_dict(TrainConfig.saved_settings(run_folder))
    _, heldout = build_data(config, model.tokenizer)
    evaluate = HeldoutLoss(heldout, config.seed)
    ids = model.tokenizer(model.config.meta_token_init, add_special_tokens=False).input_ids
    with torch.no_grad():
        learned = evaluate(model, config.max_steps)["eval/nll_with_thought"]
        init = model.lm.get_input_embeddings()(torch.tensor(ids[:1]))[0]
        model.embedding.scaled_vectors.copy_((init / model.config.meta_token_lr_multiplier).expand(2, -1))
        return learned, evaluate(model, config.max_steps)["eval/nll_with_thought"]


def bf16_rounding() -> None:
    print("## 3. bf16 weights: the share an Adam step of size lr leaves unchanged\n")
    print("| weights | lr 1e-6 | lr 3e-5 | lr 1e-4 |")
    print("|---|---|---|---|")
    lm = make_lm("mistral")
    groups = {"matrices (std 0.02 at init)": [p for p in lm.parameters() if p.dim() == 2],
              "norm weights (1.0)": [p for p in lm.parameters() if p.dim() == 1]}
    for name, params in groups.items():
        w = torch.cat([p.detach().flatten() for p in params]).to(torch.bfloat16)
        cells = []
        for lr in (1e-6, 3e-5, 1e-4):
            # Adam's step is about lr in size whatever the gradient's scale; either sign
            up, down = (w.float() + lr).to(torch.bfloat16), (w.float() - lr).to(torch.bfloat16)
            cells.append(f"{((up == w) & (down == w)).float().mean().item():.1%}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


def reference_eval_sampling() -> None:
    print("## 4. The reference's evaluation thoughts: hard Gumbel-softmax at tau 0.001\n")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, generator=g) * 2
    draws = 100_000
    torch.manual_seed(0)
    picks = F.gumbel_softmax(z.expand(draws, -1), tau=0.001, hard=True).argmax(-1)
    freq = torch.bincount(picks, minlength=50).float() / draws
    p = z.softmax(-1)
    greedy = F.one_hot(z.argmax(), 50).float()
    print(f"{draws} draws over 50 tokens: total variation to softmax(z) (temperature 1) "
          f"{0.5 * (freq - p).abs().sum().item():.4f}; to greedy (argmax) {0.5 * (freq - greedy).abs().sum().item():.4f}; "
          f"the argmax's probability {p.max().item():.3f}\n")


def main() -> None:
    torch.set_num_threads(1)
    objective_table()
    with tempfile.TemporaryDirectory() as tmp:
        training_runs(Path(tmp))
    bf16_rounding()
    reference_eval_sampling()


if __name__ == "__main__":
    main()
