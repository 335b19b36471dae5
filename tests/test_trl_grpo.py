"""RLP / RPT through TRL's GRPOTrainer (quietstar.training.trl_grpo) against the native objectives.

On the same fixed thoughts the TRL rewards equal the native ones (the parallel rollout's
``score_thoughts`` and the EMA copy, written out here as a reference), and one GRPO step with
the preset (rewards unscaled and weighted G/(G-1), beta 0, SGD, no clipping) moves every weight
as the native RLP step does. Tolerances: 1e-5 absolute on rewards; on the weight updates 1e-4
of the largest update (~1e-5 measured): TRL scores each thought as its own left-padded sequence,
the native rollout all positions in batched passes with its own attention function, and both
updates are differences of float32 weights, so they differ by float32 rounding only. In bfloat16
(TRL's default ``bf16=True``, off here) they differ by ~3e-3 of it. The EMA copy resumes with
Trainer's resume exactly (bit for bit).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

trl = pytest.importorskip("trl")

from conftest import CORPUS, TOKENIZER_SIZE, load_script, make_lm, make_tokenizer  # noqa: E402
from quietstar import QuietStarConfig, QuietStarForCausalLM  # noqa: E402
from quietstar.training import trl_grpo  # noqa: E402
from quietstar.utils.errors import MissingDependencyError, QuietStarInputError  # noqa: E402

K, H, G = 3, 2, 3


def config(objective: str = "rlp", **kw) -> QuietStarConfig:
    return QuietStarConfig(objective=objective, sampled_thought_tokens=K, ahead_tokens=H, thoughts_per_position=G,
                           thought_temperature=0.7, meta_token_lr_multiplier=1.0, **kw)


def native_and_policy(cfg: QuietStarConfig, vocab_size: int | None = None):
    """The native model and a TRL policy of the same weights (START/END rows = its meta vectors)."""
    model = QuietStarForCausalLM.from_base(make_lm("llama", vocab_size=vocab_size), make_tokenizer(), cfg)
    tok = make_tokenizer()
    policy = trl_grpo.prepare_policy(make_lm("llama", vocab_size=vocab_size), tok, cfg)
    with torch.no_grad():
        policy.get_input_embeddings().weight[[model.start_id, model.end_id]] = model.embedding.meta_vectors
    return model, policy, tok


def batch(dataset, tok):
    """The documents of ``dataset``'s rows as one right-padded batch, and their thinking positions."""
    docs = sorted({row["document"] for row in dataset})
    ids = [tok(CORPUS[d]).input_ids[:24] for d in docs]
    L = max(map(len, ids))
    x, mask, where = torch.zeros(len(ids), L, dtype=torch.long), torch.zeros(len(ids), L, dtype=torch.long), \
        torch.zeros(len(ids), L, dtype=torch.bool)
    for b, row in enumerate(ids):
        x[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
    for row in dataset:
        b = docs.index(row["document"])
        assert row["prefix_ids"] == ids[b][:row["position"] + 1]
        where[b, row["position"]] = True
    return x, mask, where, docs


def rows_of(cfg, tok, positions=2):
    return trl_grpo.position_dataset(CORPUS, tok, cfg, seq_len=24, positions_per_document=positions,
                                     selection="random", num_heldout=0, seed=1)["train"]


def thoughts_for(dataset, count: int, seed: int = 0) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 300, (count, K), generator=g).tolist() for _ in range(len(dataset))]


@pytest.mark.parametrize("objective", ["rlp", "rpt"])
def test_trl_rewards_equal_the_native_rewards_on_the_same_thoughts(objective):
    cfg = config(objective)
    model, policy, tok = native_and_policy(cfg)
    dataset = rows_of(cfg, tok)
    thoughts = [t[0] for t in thoughts_for(dataset, 1)]
    reward = trl_grpo.ThoughtReward(tok, cfg)
    ema = None
    if objective == "rlp":  # an EMA copy apart from the LM, the same in both
        model.ema_baseline_enable()
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.ema_lm.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        ema = copy.deepcopy(policy)
        ema.load_state_dict(model.ema_lm.state_dict())  # its START/END rows differ: the copy reads text only
    reward.bind(policy, ema)
    got = torch.tensor(reward(dataset["prompt"], None, thoughts, prefix_ids=dataset["prefix_ids"],
                              target_ids=dataset["target_ids"]))

    # The reference: the native rollout's post-thought logits, one thought per position.
    x, mask, where, docs = batch(dataset, tok)
    thought_ids = torch.zeros(*x.shape, K, dtype=torch.long)
    for row, t in zip(dataset, thoughts):
        thought_ids[docs.index(row["document"]), row["position"]] = torch.tensor(t)
    with torch.no_grad():
        after = model.score_thoughts(x, thought_ids, mask, thought_positions=where).thought_logits.log_softmax(-1)
        if objective == "rlp":
            hidden = model.ema_lm.get_decoder()(input_ids=x, attention_mask=mask).last_hidden_state
            ema_logp = model.logits(hidden, lm=model.ema_lm).log_softmax(-1)
    want = []
    for row in dataset:
        b, i, targets = docs.index(row["document"]), row["position"], row["target_ids"]
        if objective == "rlp":
            want.append(sum(after[b, i, s, t] - ema_logp[b, i + s, t] for s, t in enumerate(targets)).item())
        else:  # the tiny tokenizer's tokens: the greedy token's text a prefix of the continuation's
            text = tok.convert_ids_to_tokens(int(after[b, i, 0].argmax()))
            joined = ["".join(tok.convert_ids_to_tokens(targets[:j])) for j in range(1, len(targets) + 1)]
            want.append(float(text in joined))
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    if objective == "rlp":
        assert got.std() > 0.01  # the thoughts earn different rewards: the comparison means something
    else:  # a continuation the greedy token does match earns 1
        b, i = docs.index(dataset[0]["document"]), dataset[0]["position"]
        hit = [int(after[b, i, 0].argmax())]
        assert reward(dataset["prompt"][:1], None, thoughts[:1], prefix_ids=dataset["prefix_ids"][:1],
                      target_ids=[hit]) == [1.0]


def grpo_args(cfg, tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
                    disable_tqdm=True, seed=0)
    return trl_grpo.grpo_config(cfg, **{**settings, **kw})


def fixed_rollout(dataset, thoughts, tok):
    """A TRL rollout_func that returns the given thoughts (G per prompt) instead of sampling."""
    by_prompt = {p: t for p, t in zip(dataset["prompt"], thoughts)}

    def rollout(prompts, trainer):
        seen: dict[str, int] = {}
        completions, prompt_ids = [], []
        for p in prompts:
            j = seen[p] = seen.get(p, -1) + 1
            completions.append(by_prompt[p][j % G])
            prompt_ids.append(tok(p).input_ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}
    return rollout


def test_one_grpo_step_moves_the_weights_as_the_native_rlp_step(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    cfg = config("rlp")
    model, policy, tok = native_and_policy(cfg, vocab_size=TOKENIZER_SIZE)  # meta ids past the matrix: resized
    dataset = rows_of(cfg, tok)
    thoughts = thoughts_for(dataset, G)
    lr = 10.0  # updates far above the weights' own float32 rounding
    native_before = {k: v.clone() for k, v in model.named_parameters()}
    policy_before = {k: v.detach().clone() for k, v in policy.named_parameters()}

    # native: one step on the same thoughts, SGD
    x, mask, where, docs = batch(dataset, tok)
    thought_ids = torch.zeros(x.shape[0], G, x.shape[1], K, dtype=torch.long)
    for row, t in zip(dataset, thoughts):
        thought_ids[docs.index(row["document"]), :, row["position"]] = torch.tensor(t)
    out = model(x, mask, thought_ids=thought_ids, thought_positions=where)
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad

    reward = trl_grpo.ThoughtReward(tok, cfg)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward, train_dataset=dataset, callbacks=[reward.callback],
                              processing_class=tok, rollout_func=fixed_rollout(dataset, thoughts, tok),
                              args=grpo_args(cfg, tmp_path, max_steps=1, per_device_train_batch_size=len(dataset) * G,
                                             optim="sgd", learning_rate=lr, max_grad_norm=0.0))
    trainer.train()

    native = {k.removeprefix("lm."): (v - native_before[k]).detach() for k, v in model.named_parameters()
              if k in native_before}  # not the EMA copy the step made
    trained = {k: (v - policy_before[k]).detach() for k, v in policy.named_parameters()}
    embed = "model.embed_tokens.weight"
    start, end = model.start_id, model.end_id
    native[embed] = torch.cat([native[embed], native.pop("embedding.scaled_vectors")])  # rows start, end
    assert (start, end) == (TOKENIZER_SIZE, TOKENIZER_SIZE + 1)
    native = {k: v for k, v in native.items() if not k.startswith("mixing_head")}  # rlp: no mixing head
    head = "lm_head.weight"
    trained[head] = trained[head][:TOKENIZER_SIZE]  # the meta rows of the head: masked, never moved
    assert set(native) == set(trained)
    scale = max(v.abs().max() for v in native.values())
    assert scale > 1e-4 and native[embed][start].abs().max() > 0  # the step moved the LM and START
    for name in native:
        torch.testing.assert_close(trained[name], native[name], atol=1e-4 * scale, rtol=0, msg=name)


def test_the_ema_copy_resumes_exactly_with_trainer_resume(tmp_path):
    cfg = config("rlp", ema_decay=0.5)
    tok = make_tokenizer()
    policy = trl_grpo.prepare_policy(make_lm("llama"), tok, cfg)
    dataset = rows_of(cfg, tok)
    start_state = copy.deepcopy(policy.state_dict())

    def run(resume):
        lm = trl_grpo.prepare_policy(make_lm("llama"), tok, cfg)
        lm.load_state_dict(start_state)
        reward = trl_grpo.ThoughtReward(tok, cfg)
        trainer = trl.GRPOTrainer(model=lm, reward_funcs=reward, train_dataset=dataset, processing_class=tok,
                                  callbacks=[reward.callback],
                                  args=grpo_args(cfg, tmp_path, max_steps=2, save_strategy="steps", save_steps=1,
                                                 learning_rate=1e-2))
        trainer.train(resume_from_checkpoint=resume)
        return reward

    straight = run(None)
    resumed = run(str(tmp_path / "checkpoint-1"))
    moved = False
    for (name, a), b, c in zip(straight.ema.named_parameters(), resumed.ema.parameters(), policy.parameters()):
        assert torch.equal(a, b), name
        moved |= not torch.equal(a, c)
    assert moved  # the copy moved away from the start
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)


def test_bad_input_is_refused_before_training(tmp_path):
    import datasets

    cfg = config("rlp")
    tok = make_tokenizer()
    with pytest.raises(QuietStarInputError, match="prepare_policy"):
        trl_grpo.position_dataset(CORPUS, tok, cfg, seq_len=24, positions_per_document=1)
    policy = trl_grpo.prepare_policy(make_lm("llama"), tok, cfg)
    with pytest.raises(QuietStarInputError, match="no 'text' column"):
        trl_grpo.position_dataset(datasets.Dataset.from_dict({"question": CORPUS}), tok, cfg, seq_len=24,
                                  positions_per_document=1, selection="random")
    with pytest.raises(QuietStarInputError, match="no thinking position"):
        trl_grpo.position_dataset(["", "a"], tok, cfg, seq_len=24, positions_per_document=1, num_heldout=0,
                                  selection="random")
    with pytest.raises(QuietStarInputError, match="group baseline"):
        trl_grpo.grpo_config(cfg, output_dir=str(tmp_path), num_generations=1)
    with pytest.raises(QuietStarInputError, match="'rlp' or 'rpt'"):
        trl_grpo.ThoughtReward(tok, QuietStarConfig())
    with pytest.raises(QuietStarInputError, match="next-token term"):
        trl_grpo.grpo_config(config("rlp", next_token_loss_weight=1.0), output_dir=str(tmp_path))

    # a tokenizer mismatch: the trainer's processing_class, or a dataset built with another tokenizer
    dataset = rows_of(cfg, tok)
    other = make_tokenizer()
    other.add_tokens(["zzz"])
    trl_grpo.prepare_policy(make_lm("llama"), other, cfg)
    reward = trl_grpo.ThoughtReward(tok, cfg)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward, train_dataset=dataset, processing_class=other,
                              callbacks=[reward.callback], args=grpo_args(cfg, tmp_path, max_steps=1))
    before = copy.deepcopy(policy.state_dict())
    with pytest.raises(QuietStarInputError, match="tokenizer mismatch"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    reward.bind(policy)
    elsewhere = [[(t + 7) % TOKENIZER_SIZE for t in dataset["prefix_ids"][0]]]  # ids of another tokenizer
    with pytest.raises(QuietStarInputError, match="tokenizer mismatch"):
        reward(dataset["prompt"][:1], None, [[5, 6, 7]], prefix_ids=elsewhere, target_ids=dataset["target_ids"][:1])
    args = grpo_args(cfg, tmp_path, max_steps=1)
    args.num_generations = 1  # a GRPOConfig changed after the preset
    with pytest.raises(QuietStarInputError, match="at least 2 thoughts"):
        reward.callback.on_train_begin(args, trainer.state, trainer.control, model=policy, processing_class=tok)


def test_without_trl_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(MissingDependencyError, match=r"pip install quietstar\[trl\]"):
        trl_grpo.grpo_config(config("rlp"), output_dir=str(tmp_path))


def test_entropy_positions_are_those_of_highest_entropy():
    cfg = config("rpt")
    tok = make_tokenizer()
    policy = trl_grpo.prepare_policy(make_lm("llama"), tok, cfg)
    rows = trl_grpo.position_dataset(CORPUS[:1], tok, cfg, seq_len=24, positions_per_document=3, model=policy,
                                     num_heldout=0, selection="entropy")["train"]
    ids = torch.tensor([tok(CORPUS[0]).input_ids[:24]])
    with torch.no_grad():
        probs = policy(ids).logits[0].softmax(-1)
    entropy = torch.special.entr(probs).sum(-1)[:-1]
    exact = [i for i in range(len(entropy))
             if tok(tok.decode(ids[0, :i + 1]) + cfg.start_thought_token).input_ids == ids[0, :i + 1].tolist() + [
                 tok.convert_tokens_to_ids(cfg.start_thought_token)]]
    want = sorted(sorted(exact, key=lambda i: -entropy[i])[:3])
    assert sorted(rows["position"]) == want


def test_example_runs_a_few_grpo_steps(tiny_model_dir, tmp_path):
    example = load_script("examples/trl_rlp.py")
    summary = example.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--max-steps", "2",
                            "--seq-len", "24", "--thought-tokens", "3"])
    assert summary["global_step"] == 2 and (tmp_path / "checkpoint-2" / trl_grpo.EMA_FILE).is_file()


def test_benchmark_measures_both_ways_tiny():
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import trl_rlp

    spec = dict(L=24, k=3, positions=2, G=2, hidden=32, layers=1, heads=2, kv_heads=1, vocab=200, reps=1)
    for way in (trl_rlp.native, trl_rlp.trl_run):
        result = way(spec)
        assert result["time_s"] > 0 and result["peak_bytes"] > 0
