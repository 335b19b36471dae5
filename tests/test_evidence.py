"""The evidence experiment (experiments/evidence.py) end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_script
from quietstar.evaluation.tasks import load_items
from quietstar.training.metrics import read_metrics
from quietstar.evaluation.statistics import seed_document_bootstrap
from quietstar.training.recipe import TrainConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def _load_experiment(name: str):
    """An experiments/ script as a module (the folder is not a package)."""
    return load_script(f"experiments/{name}.py")


evidence = _load_experiment("evidence")


def test_pipeline_runs_all_arms_on_the_same_batches(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--model", str(tiny_model_dir), "--data", "builtin:arithmetic",
            "--num-documents", "40", "--heldout-documents", "4", "--nll-documents", "3",
            "--set", "thought_fraction=0.5", "--gsm8k-questions", str(FIXTURES / "gsm8k_tiny.jsonl"), "--question-limit", "2",
            "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-3",
            "--warmup-steps", "0", "--thought-tokens", "2", "--ahead-tokens", "2",
            "--eval-max-length", "24"]
    result = evidence.main(argv)

    for name in ("results.md", "results.json", "curves.png", "difficulty.png", "nll_base.npz",
                 "nll_control.npz", "nll_quietstar.npz"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["n_tokens"] == result["n_tokens"]
    assert "python experiments/evidence.py --out" in (out / "results.md").read_text()
    assert result["n_documents"] == 3  # --nll-documents: the first 3 of the 4 held out
    assert TrainConfig.saved_settings(out / "quietstar")["quietstar"]["thought_fraction"] == 0.5
    hardest = result["nll"]["hardest"]["base"]["n"]
    assert hardest == int(np.ceil(0.1 * result["n_tokens"]))
    assert set(result["direct"]) == {"gsm8k"}

    # Same data order: both arms' first step sees the same batch at the same (initial) weights,
    # so the control's first loss is Quiet-STaR's first base NLL.
    control = read_metrics(out / "control" / "metrics.jsonl")
    quietstar = [r for r in read_metrics(out / "quietstar" / "metrics.jsonl") if "loss" in r]
    assert len(control) == len(quietstar) == 3
    assert control[0]["loss"] == pytest.approx(quietstar[0]["base_nll"], rel=1e-5)
    assert [r["lr"] for r in control] == pytest.approx([r["lr"] for r in quietstar])

    # The untrained arm is the base LM itself: its token NLLs match a plain HF forward.
    base = np.load(out / "nll_base.npz")
    model = build_model(TrainConfig(model=str(tiny_model_dir))).eval()
    text = evidence.load_texts("builtin:arithmetic", num_documents=40)[0]
    ids = torch.tensor([model.tokenizer(text).input_ids[:24]])
    with torch.no_grad():
        logits = model.lm(input_ids=ids).logits[0, :-1]
    logits[:, [model.start_id, model.end_id]] = float("-inf")  # the model never predicts them
    reference = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").numpy()
    np.testing.assert_allclose(base["nll_without"][:23], reference, rtol=1e-4, atol=1e-5)

    # --reuse keeps finished arms: nothing is retrained, the numbers are the same.
    again = evidence.main(argv + ["--reuse"])
    assert again["difference"] == result["difference"]

    # --train-only: arm 1 alone, trained the same way (same first step), nothing measured.
    alone = evidence.main([a if a != str(out) else str(tmp_path / "alone") for a in argv] + ["--train-only"])
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["quietstar"]
    assert Path(alone["checkpoint"]).name == "checkpoint-000003"
    first = [r for r in read_metrics(tmp_path / "alone" / "quietstar" / "metrics.jsonl") if "loss" in r][0]
    assert first["base_nll"] == pytest.approx(quietstar[0]["base_nll"], rel=1e-6)


def test_plain_nll_is_the_language_model_loss_without_meta_tokens(tiny_model_dir):
    model = build_model(TrainConfig(model=str(tiny_model_dir))).eval()
    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = evidence.plain_nll(model, ids, mask, ids)
        logits = model.lm(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logits[..., [model.start_id, model.end_id]] = float("-inf")  # the model never predicts them
    reference = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:])
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_hardest_tokens_are_ranked_by_the_untrained_model():
    # 20 tokens in 4 documents; the base NLL ranks tokens 18 and 19 hardest (top 10%).
    base = np.arange(20, dtype=float)
    document = np.repeat(np.arange(4), 5)
    with_thoughts = base - 1.0
    with_thoughts[18:] -= 2.0  # thinking helps by 3 nats on the hardest tokens, 1 elsewhere
    arms = {"base": {"nll_without": base, "document": document},
            "control": {"nll_without": base - 0.5, "document": document},
            "quietstar": {"nll_with": with_thoughts, "nll_without": base, "document": document}}
    result = evidence.compare(arms, seed=0)
    hard = result["difference"]["hardest"]
    assert result["hardest_min_base_nll"] == 18.0
    assert hard["quietstar_with - control"]["mean"] == pytest.approx(-2.5)
    assert hard["quietstar_with - quietstar_without"]["mean"] == pytest.approx(-3.0)
    everything = result["difference"]["all"]["quietstar_with - quietstar_without"]["mean"]
    assert everything == pytest.approx(-(18 * 1 + 2 * 3) / 20)
    assert evidence.verdict(hard["quietstar_with - quietstar_without"]) == "thinking better (CI < 0)"


def test_questions_inside_the_training_text_are_refused():
    items = {"gsm8k": load_items("gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl"))}
    training = [f"Question: {items['gsm8k'][1].question}\nAnswer: 42"]
    with pytest.raises(ValueError, match="appears in the training data"):
        evidence.check_disjoint(training, ["an unrelated held-out text"], items)
    evidence.check_disjoint(["other text"], ["an unrelated held-out text"], items)  # fine


def test_method_and_optimiser_settings_reach_the_quietstar_arm(tmp_path):
    args = evidence.parse_args(["--out", str(tmp_path), "--base-loss-weight", "1.0",
                                "--mixed-loss-weight", "0.25", "--mixing-head-lr-multiplier", "10",
                                "--policy-max-grad-norm", "2"])
    config = evidence.train_config(args, tmp_path)
    assert (config.quietstar.base_loss_weight, config.quietstar.mixed_loss_weight) == (1.0, 0.25)
    assert (config.mixing_head_lr_multiplier, config.policy_max_grad_norm) == (10.0, 2.0)
    default = evidence.train_config(evidence.parse_args(["--out", str(tmp_path)]), tmp_path).quietstar
    assert (default.base_loss_weight, default.mixed_loss_weight) == (0.5, 0.5)
    assert evidence.train_config(evidence.parse_args(["--out", str(tmp_path)]), tmp_path).policy_max_grad_norm is None
    # --set reaches any other method field, typed and validated by QuietStarConfig.
    args = evidence.parse_args(["--out", str(tmp_path), "--set", "reward_source=thought",
                                "--set", "thought_loss_weight=0.1", "--set", "thought_fraction=0.25"])
    method = evidence.train_config(args, tmp_path).quietstar
    assert (method.reward_source, method.thought_loss_weight, method.thought_fraction) == ("thought", 0.1, 0.25)
    for bad, message in (("thought_fractio=0.25", "QuietStarConfig field"), ("reward_source", "KEY=VALUE"),
                         ("thought_fraction=2", "thought_fraction")):
        with pytest.raises(ValueError, match=message):
            evidence.train_config(evidence.parse_args(["--out", str(tmp_path), "--set", bad]), tmp_path)


# ---------------------------------------------------------------------------- pooling seeds
pool_seeds = _load_experiment("pool_seeds")


def test_seed_bootstrap_counts_seed_to_seed_variation_as_noise():
    documents = np.repeat(np.arange(6), 5)
    # Two seeds that disagree completely and have no document-level noise: the pooled mean is 0
    # and every resample's mean is -1, 0 or +1, so the 95% interval is [-1, +1].
    split = np.stack([np.full(30, -1.0), np.full(30, 1.0)])
    assert seed_document_bootstrap(split, documents) == (-1.0, 1.0)
    # Identical seeds: only the documents vary, as in one run's own interval.
    one = np.random.default_rng(0).normal(-0.5, 1.0, 30)
    low, high = seed_document_bootstrap(np.stack([one, one, one]), documents)
    single = evidence.summarize(one, documents)
    assert low < one.mean() < high
    assert low == pytest.approx(single["ci_low"], abs=0.1) and high == pytest.approx(single["ci_high"], abs=0.1)


def _fake_run(folder: Path, base: np.ndarray, document: np.ndarray, shift: float) -> Path:
    folder.mkdir(parents=True)
    np.savez(folder / "nll_base.npz", nll_without=base, document=document)
    np.savez(folder / "nll_control.npz", nll_without=base - 1.0, document=document)
    np.savez(folder / "nll_quietstar.npz", nll_with=base - 1.0 + shift, nll_without=base - 1.0,
             document=document)
    return folder


def test_pooled_report_of_fake_runs(tmp_path):
    base = np.arange(40, dtype=float)
    document = np.repeat(np.arange(8), 5)
    runs = [_fake_run(tmp_path / f"seed{i}", base, document, shift) for i, shift in enumerate((-0.2, -0.4))]
    result = pool_seeds.main([str(r) for r in runs] + ["--out", str(tmp_path / "pooled")])
    pooled = result["pooled"]["hardest"]["quietstar_with - control"]
    assert pooled["mean"] == pytest.approx(-0.3)
    assert pooled["ci_low"] == pytest.approx(-0.4) and pooled["ci_high"] == pytest.approx(-0.2)
    per_seed = result["per_seed"]["hardest"]["quietstar_with - quietstar_without"]
    assert [s["mean"] for s in per_seed] == pytest.approx([-0.2, -0.4])
    text = (tmp_path / "pooled" / "results.md").read_text()
    assert "**pooled, hardest 10%**" in text and "thinking better (CI < 0)" in text
    assert (tmp_path / "pooled" / "seeds.png").stat().st_size > 0


def test_pooling_refuses_runs_on_other_held_out_text(tmp_path):
    document = np.repeat(np.arange(4), 5)
    a = _fake_run(tmp_path / "a", np.arange(20, dtype=float), document, -0.1)
    b = _fake_run(tmp_path / "b", np.arange(20, dtype=float) + 1, document, -0.1)
    with pytest.raises(ValueError, match="did not score the same held-out tokens"):
        pool_seeds.main([str(a), str(b), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="neither a finished evidence run"):
        pool_seeds.main([str(a), str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    c = _fake_content(tmp_path / "c", np.arange(20, dtype=float), document, -0.1, "all")
    with pytest.raises(ValueError, match="not the same kind of run"):
        pool_seeds.main([str(a), str(c), "--out", str(tmp_path / "out")])


def _fake_content(folder: Path, untrained, document, shift: float, think_at: str) -> Path:
    """A thought_content.py result: own thoughts ``shift`` better than random, 2 * shift than shifted."""
    folder.mkdir(parents=True)
    without = untrained - 1.0
    np.savez(folder / "nll.npz", untrained=untrained, document=document, without=without,
             sampled=without + shift, random=without, shifted=without - shift)
    (folder / "results.json").write_text(json.dumps({"think_at": think_at}))
    return folder


def test_pooled_report_of_thought_content_results(tmp_path):
    untrained = np.arange(40, dtype=float)
    document = np.repeat(np.arange(8), 5)
    runs = [_fake_content(tmp_path / f"seed{i}" / "thought-content", untrained, document, shift, "hardest")
            for i, shift in enumerate((-0.1, -0.3))]  # folders of one name: named by their run
    result = pool_seeds.main([str(r) for r in runs] + ["--out", str(tmp_path / "pooled")])
    assert result["runs"] == ["seed0/thought-content", "seed1/thought-content"]
    assert set(result["pooled"]) == {"hardest"}  # only the hardest tokens thought
    assert result["pooled"]["hardest"]["sampled - random"]["mean"] == pytest.approx(-0.2)
    assert result["pooled"]["hardest"]["sampled - shifted"]["mean"] == pytest.approx(-0.4)
    assert [s["mean"] for s in result["per_seed"]["hardest"]["sampled - without"]] == pytest.approx([-0.1, -0.3])
    text = (tmp_path / "pooled" / "results.md").read_text()
    assert "sampled - shifted" in text and "pooled, all tokens" not in text



# ---------------------------------------------------------------------------- thought content
def test_thought_content_scores_own_thoughts_and_both_controls(tiny_model_dir, tmp_path):
    from quietstar.evaluation.analysis import token_nlls
    from quietstar.data.corpora import load_texts
    from quietstar.models.modeling import QuietStarForCausalLM

    trained = build_model(TrainConfig(model=str(tiny_model_dir))).eval()
    with torch.no_grad():
        trained.mixing_head.mlp[-1].bias.fill_(0.6)  # thoughts change the prediction
    trained.save_pretrained(tmp_path / "trained")
    content = _load_experiment("thought_content")
    result = content.main(["--model", str(tmp_path / "trained"), "--base-model", str(tiny_model_dir),
                           "--data", "builtin:arithmetic", "--heldout-documents", "3",
                           "--eval-max-length", "24", "--out", str(tmp_path / "out")])
    # "sampled" is what analysis.token_nlls measures with the same seed, "without" its base.
    texts = list(load_texts("builtin:arithmetic", seed=0))[:3]
    reference = token_nlls(QuietStarForCausalLM.from_pretrained(tmp_path / "trained").eval(), texts,
                           max_length=24, seed=0)
    nll = np.load(tmp_path / "out" / "nll.npz")
    np.testing.assert_allclose(nll["sampled"], reference.thinking, rtol=1e-5)
    np.testing.assert_allclose(nll["without"], reference.base, rtol=1e-5)
    assert not np.allclose(nll["random"], nll["sampled"])
    assert set(result["difference"]["hardest"]) == {f"{a} - {b}" for a, b in content.COMPARISONS}
    assert "| random |" in (tmp_path / "out" / "results.md").read_text()

    # --think-at hardest: only the hardest 10% think; the rest keep the trained model's base NLL.
    hard = content.main(["--model", str(tmp_path / "trained"), "--base-model", str(tiny_model_dir),
                         "--data", "builtin:arithmetic", "--heldout-documents", "3",
                         "--eval-max-length", "24", "--think-at", "hardest", "--out", str(tmp_path / "hard")])
    few = np.load(tmp_path / "hard" / "nll.npz")
    chosen = np.zeros(few["untrained"].size, dtype=bool)
    chosen[content.token_subsets(few["untrained"])["hardest"]] = True
    for source in content.THOUGHT_SOURCES:
        np.testing.assert_allclose(few[source][~chosen], few["without"][~chosen], rtol=1e-6)
        assert not np.allclose(few[source][chosen], few["without"][chosen])
    assert set(hard["nll"]) == {"hardest"} and hard["think_at"] == "hardest"
    assert "all tokens" not in (tmp_path / "hard" / "results.md").read_text()


def test_results_summary_matches_the_recorded_runs():
    """docs/results/summary.json is read by people and tools: its main-job figures must be the
    ones the recorded runs logged, and its real-text cells the thought-content results."""
    import json
    import re

    results = ROOT / "docs" / "results"
    summary = json.loads((results / "summary.json").read_text())
    for seed, figures in summary["main_job"]["heldout_nll"].items():
        log = (results / "main-job-preset" / f"attempt2-B-{seed.replace('_', '')}" / "train.log").read_text()
        without, with_ = map(float, re.findall(r"step 20 held-out: nll_without_thought ([\d.]+), nll_with_thought ([\d.]+)", log)[-1])
        assert (figures["without_thought"], figures["with_thought"]) == (without, with_)
        assert figures["with_thought"] < figures["without_thought"]
    content = json.loads((results / "run8-gsm8k-pw1-seed3" / "thought-content" / "results.json").read_text())
    cell = summary["single_model_real_text"]["own_minus_shifted_hardest10"]
    assert cell["mean"] == round(content["difference"]["hardest"]["sampled - shifted"]["mean"], 4)
    for entry, folder, seeds in (("pooled_real_text", "content-pooled-seeds-0-2", [0, 1, 2]),
                                 ("pooled_real_text_attempt_2", "content-clip-pooled-seeds-3-5", [3, 4, 5]),
                                 ("pooled_real_text_attempt_3", "content-read-pooled-seeds-6-8", [6, 7, 8])):
        pooled = results / folder
        content = json.loads((pooled / "thought-content" / "results.json").read_text())["pooled"]["hardest"]
        arms = json.loads((pooled / "evidence" / "results.json").read_text())["pooled"]["hardest"]
        real = summary[entry]
        for key, source in (("own_minus_shifted_hardest10", content["sampled - shifted"]),
                            ("own_minus_random_hardest10", content["sampled - random"]),
                            ("with_minus_control_hardest10", arms["quietstar_with - control"]),
                            ("with_minus_without_hardest10", arms["quietstar_with - quietstar_without"])):
            if key == "with_minus_without_hardest10" and key not in real:
                continue  # optional; the three are required
            assert [real[key][k] for k in ("mean", "ci_low", "ci_high")] == \
                [round(source[k], 4) for k in ("mean", "ci_low", "ci_high")], (entry, key)
            assert real[key]["seeds"] == seeds
        # each attempt's status says the bar was not met, and at least one content CI agrees
        assert "bar not met" in real["status"]
        assert any(real[key]["ci_high"] >= 0 for key in ("own_minus_shifted_hardest10", "own_minus_random_hardest10"))
    for seed, cells in summary["scratchpad_toy"]["per_seed"].items():
        run = json.loads((results / "scratchpad-dev" / f"confirm-{seed.replace('_', '')}.json").read_text())
        assert cells["own_minus_shifted_answers"]["mean"] == round(run["own - shifted"]["mean"], 4)
        assert cells["own_minus_random_answers"]["ci_high"] == round(run["own - random"]["ci_high"], 4) < 0
    for seed, cells in summary["scratchpad_decoy_toy"]["per_seed"].items():
        name = f"decoy-confirm-{seed.replace('_', '')}"
        run = json.loads((results / "scratchpad-dev" / f"{name}.json").read_text())
        ablation = json.loads((results / "scratchpad-dev" / f"{name}-pw0.json").read_text())
        assert cells["share_rise"]["mean"] == round(run["share_p_q_after - before"]["mean"], 4)
        assert cells["share_rise"]["ci_low"] > 0.2 and cells["own_minus_shifted_answers"]["ci_high"] < 0
        assert cells["share_rise_without_reinforce"]["mean"] == round(ablation["share_p_q_after - before"]["mean"], 4)
        assert cells["share_rise"]["mean"] - cells["share_rise_without_reinforce"]["mean"] >= 0.2
    successors = json.loads((results / "successors" / "results.json").read_text())
    for key, cell in summary["successors_equal_wall_time"].items():
        match = re.fullmatch(r"(\w+?)_own_minus_(\w+)_hardest10", key)
        if match is None:
            continue
        arm = successors["arms"][match[1]]
        pooled = arm["differences"][f"own - {match[2]}"]
        assert [cell[k] for k in ("mean", "ci_low", "ci_high")] == [round(pooled[k], 4) for k in ("mean", "ci_low", "ci_high")], key
        assert cell["seeds"] == arm["seeds"], key  # an arm pooled over fewer seeds must say so
    distillation = json.loads((results / "distillation" / "results.json").read_text())
    cells = {"distilled_minus_cp_hardest10": ("hardest", "distilled - cp"), "distilled_minus_cp_all": ("all", "distilled - cp"),
             "distilled_minus_teacher_with_hardest10": ("hardest", "distilled - teacher with"),
             "distilled_minus_teacher_without_hardest10": ("hardest", "distilled - teacher without"),
             "distilled_minus_teacher_without_all": ("all", "distilled - teacher without"),
             "teacher_with_minus_without_hardest10": ("hardest", "teacher with - teacher without")}
    for key, (subset, difference) in cells.items():
        cell, pooled = summary["distillation_equal_compute"][key], distillation["differences"][subset][difference]
        assert [cell[k] for k in ("mean", "ci_low", "ci_high")] == [round(pooled[k], 4) for k in ("mean", "ci_low", "ci_high")], key
        assert cell["seeds"] == distillation["seeds"], key
    assert ("bar not met" in summary["distillation_equal_compute"]["status"]) == (not distillation["bar_met"])


# ---------------------------------------------------------------------------- comparing variants
compare_variants = _load_experiment("compare_variants")


def test_variants_are_compared_seed_by_seed(tmp_path):
    untrained = np.arange(40, dtype=float)
    document = np.repeat(np.arange(8), 5)

    def variant(name, lm_shift, thought_shift):  # two seeds; seed i's LM is i * 0.1 worse
        folders = []
        for i in range(2):
            folder = tmp_path / f"{name}{i}"
            folder.mkdir()
            without = untrained - 1.0 + lm_shift + 0.1 * i
            np.savez(folder / "nll.npz", untrained=untrained, document=document, without=without,
                     sampled=without + thought_shift, random=without, shifted=without)
            (folder / "results.json").write_text(json.dumps({"think_at": "hardest"}))
            folders.append(str(folder))
        return folders

    result = compare_variants.main(["--variant", "E", *variant("E", 0.0, -0.3), "--variant", "F",
                                    *variant("F", -0.1, -0.1), "--out", str(tmp_path / "out")])
    hard = result["differences"]["hardest"]
    assert set(result["differences"]) == {"hardest"}
    assert hard["E: with - without"]["pooled"]["mean"] == pytest.approx(-0.3)
    assert hard["F: with - without"]["pooled"]["mean"] == pytest.approx(-0.1)
    assert hard["E - F, without"]["pooled"]["mean"] == pytest.approx(0.1)  # F's LM better
    # E's thoughts win back more than F's LM is ahead: -0.3 + 0.1 + 0.1 = -0.1, the same at every seed.
    assert [s["mean"] for s in hard["E - F, with"]["per_seed"]] == pytest.approx([-0.1, -0.1])
    assert hard["E - F, with"]["pooled"]["ci_low"] == pytest.approx(-0.1)
    assert "| E - F, with |" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match="same number of folders"):
        compare_variants.main(["--variant", "E", *variant("G", 0, 0), "--variant", "F",
                               variant("H", 0, 0)[0], "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="hold no thought_content.py result"):
        compare_variants.main(["--variant", "E", str(tmp_path), "--variant", "F", str(tmp_path),
                               "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------------------- distillation's report
distillation = _load_experiment("distillation")


def test_distillation_report_pairs_each_seeds_arms(tmp_path):
    untrained = np.arange(40, dtype=float)
    document = np.repeat(np.arange(8), 5)
    # arm: (NLL without thought at seed i, with thought) as offsets from the untrained NLL
    arms = {"cp": (-1.0, None), "teacher": (-0.5, -0.6), "distilled": (-0.58, None)}
    folders = []
    for seed in (12, 13):
        for arm, (without, with_) in arms.items():
            if seed == 13 and arm == "distilled":
                continue  # seed 13 lacks an arm: left out, and said so
            folder = tmp_path / f"{arm}-seed{seed}"
            folder.mkdir()
            nll = {"untrained": untrained, "document": document, "without": untrained + without + 0.01 * seed}
            if with_ is not None:
                nll["with"] = untrained + with_ + 0.01 * seed
            np.savez(folder / "measured.npz", **nll)
            meta = {"arm": arm, "seed": seed, "steps": 3, "train_s": 1.0, "median_step_s": 0.5}
            if arm == "distilled":
                meta["export_check_max_abs"] = 1e-6
            (folder / "run.json").write_text(json.dumps(meta))
            folders.append(str(folder))
    distillation.main(["report", "--out", str(tmp_path / "out"), *folders])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["seeds"] == [12] and result["left_out_seeds"] == [13]
    hard = result["differences"]["hardest"]
    assert hard["distilled - cp"]["mean"] == pytest.approx(0.42)
    assert hard["distilled - teacher with"]["mean"] == pytest.approx(0.02)
    assert hard["teacher with - teacher without"]["mean"] == pytest.approx(-0.1)
    assert result["hardest_tokens"] == 4 and not result["bar_met"]
    assert "**not met**" in (tmp_path / "out" / "results.md").read_text()

    np.savez(tmp_path / "cp-seed12" / "measured.npz", untrained=untrained, document=document[::-1],
             without=untrained)  # the same NLLs of other documents' tokens: refused
    with pytest.raises(ValueError, match="scored other held-out tokens"):
        distillation.main(["report", "--out", str(tmp_path / "out2"), *folders])
