"""The benchmarks measure what they claim: the dense reference computes the same numbers as
quietstar, the memory tracker counts bytes correctly, and the scripts run end to end."""

from __future__ import annotations

import copy
import json
import os
import re
import sys

import pytest
import torch
from conftest import FAMILIES, make_lm, make_model, make_tokenizer, random_text
from test_losses import reference as hand_objective
from test_losses import valid_from_labels

from quietstar import QuietStarConfig, QuietStarForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import dense_reference
import distill_step
import gpu
import rlp_step
import train_step
from dense_reference import DenseQuietStar


def _model_with_live_head(family: str):
    """A model whose mixing head is not zero, so the mixed logits differ from the base ones."""
    model = make_model(family)
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
        model.mixing_head.mlp[-1].bias.fill_(0.3)
    return model


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding window 7 < length
def test_dense_reference_scores_equal_score_thoughts(family):
    model = _model_with_live_head(family)
    dense = DenseQuietStar(model)
    ids = random_text(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    thoughts = random_text(2, 12 * 3, seed=1).view(2, 12, 3)
    with torch.no_grad():
        ours = model.score_thoughts(ids, thoughts, mask)
        ref = dense.score_thoughts(ids, thoughts, mask)
    real = mask.bool()
    for name in ("base_logits", "thought_logits", "mixing_weight", "mixed_logits"):
        a, b = getattr(ours, name)[real], getattr(ref, name)[real]
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b)), name  # the meta tokens are -inf in both
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=0, msg=name)
    # The mixed prediction really differs from the base one, so the mixing is exercised.
    assert (ours.mixed_logits[..., 0, :] - ours.base_logits).abs().nan_to_num().max() > 1e-3


def test_dense_training_step_equals_quietstar():
    """Same generator seed: the same thoughts are sampled, and loss and gradients agree."""
    model = _model_with_live_head("llama")
    dense = DenseQuietStar(model)
    model.train()
    dense.train()
    ids = random_text(2, 10)
    ours = model(ids, generator=torch.Generator().manual_seed(3))
    loss, metrics, thoughts = dense(ids, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours.thought_ids, thoughts)
    torch.testing.assert_close(loss, ours.loss, rtol=1e-5, atol=0)
    for name, value in metrics.items():
        torch.testing.assert_close(value, ours.metrics[name], rtol=1e-5, atol=1e-6, msg=name)
    ours.loss.backward()
    loss.backward()
    ref_params = dict(dense.model.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        ref = ref_params[name].grad
        torch.testing.assert_close(p.grad, ref, atol=1e-4 * ref.abs().max().item() + 1e-12, rtol=0,
                                   msg=name)
        checked += 1
    assert checked >= 10


# ------------------------------------------------------------------ the dense reference on its own
# The tests above check the dense reference against quietstar: a mistake both share would pass
# them. These check it against the plain base model, run position by position on
# x_0..x_i START t_1..t_k END x_{i+1}..x_{i+A-1} (an untouched deep copy of the LM, eager
# attention, no padding), and its objective against the hand-written one of tests/test_losses.py.
def dense_and_plain(family, seed=0, **config):
    lm = make_lm(family, seed)
    plain = copy.deepcopy(lm)  # before from_base routes the attention to quietstar's
    config = QuietStarConfig(**{"sampled_thought_tokens": 3, "ahead_tokens": 3, **config})
    dense = DenseQuietStar(QuietStarForCausalLM.from_base(lm, make_tokenizer(), config))
    with torch.no_grad():  # a live mixing head, so the mixed logits differ from the base ones
        dense.model.mixing_head.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        dense.model.mixing_head.mlp[-1].bias.fill_(0.3)
    return dense, plain


def run_plain(dense, plain, ids):
    """(final hidden states [T, d], logits [T, V]) of the plain LM on one unpadded sequence,
    meta tokens embedded as the dense model embeds them, and the meta tokens' logits -inf (the
    wrapped model never predicts them; they may lie beyond the LM head)."""
    with torch.no_grad():
        out = plain(inputs_embeds=dense.model.get_input_embeddings()(ids[None]), output_hidden_states=True)
    logits = out.logits[0].clone()
    V = logits.shape[-1]
    logits[:, [i for i in (dense.model.start_id, dense.model.end_id) if i < V]] = float("-inf")
    return out.hidden_states[-1][0], logits


def thought_sequence(dense, text, i, thought, A):
    m = dense.model
    return torch.cat([text[:i + 1], torch.tensor([m.start_id]), thought, torch.tensor([m.end_id]),
                      text[i + 1:i + A]])


def assert_equal_logits(got, want):
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)  # -inf exactly at the meta tokens
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if f != "gemma2"))  # gemma2: refused
@pytest.mark.parametrize("padding", ["left", "right"])
def test_dense_scores_equal_the_plain_model_position_by_position(family, padding):
    dense, plain = dense_and_plain(family)
    m, K, A = dense.model, 3, 3
    B, L = 2, 10
    x = random_text(B, L, seed=3)
    mask = torch.ones_like(x)
    if padding == "left":
        mask[1, :3] = 0
    else:
        mask[1, L - 3:] = 0
    thoughts = random_text(B * L, K, seed=4).view(B, L, K)
    with torch.no_grad():
        scores = dense.score_thoughts(x, thoughts, mask)
    head = m.mixing_head
    w_all = scores.mixing_weight[mask.bool()]
    assert w_all.abs().mean() > 0.1 and w_all.std() > 0.1  # the mixing is exercised, w varies
    for b in range(B):
        columns = mask[b].nonzero().flatten()
        text = x[b, columns]  # the row as it would be without padding
        base_hidden, base_logits = run_plain(dense, plain, text)
        assert_equal_logits(scores.base_logits[b, columns], base_logits)
        for i, col in enumerate(columns):
            hidden, logits = run_plain(dense, plain, thought_sequence(dense, text, i, thoughts[b, col], A))
            end = i + 1 + K + 1  # END's index in the sequence
            for s in range(min(A, len(text) - i)):
                assert_equal_logits(scores.thought_logits[b, col, s], logits[end + s])
                # w from the base state of position i+s and the post-thought state; the mixed
                # hidden state through the LM head
                with torch.no_grad():
                    w = head.weight(base_hidden[i + s], hidden[end + s])
                    mixed = m.logits(base_hidden[i + s] + w * (hidden[end + s] - base_hidden[i + s]))
                torch.testing.assert_close(scores.mixing_weight[b, col, s], w, atol=1e-5, rtol=0)
                assert_equal_logits(scores.mixed_logits[b, col, s], mixed)


@pytest.mark.parametrize("baseline, drop", [("thought_mean", True), ("base", False)])
def test_dense_training_forward_equals_the_hand_written_objective(monkeypatch, baseline, drop):
    """The dense training forward: its log-probabilities are those of the plain model position
    by position (its own targets, thoughts and REINFORCE temperature), and its loss and metrics
    are tests/test_losses.py's hand-written objective of them."""
    K, A, n, T = 3, 3, 2, 3.0
    dense, plain = dense_and_plain(
        "llama", thoughts_per_position=n, reward_baseline=baseline, drop_negative_rewards=drop,
        policy_logprob_temperature=T, base_loss_weight=0.25, mixed_loss_weight=0.75,
        policy_loss_weight=2.0)
    # float64 (Llama's RMSNorm still rounds to float32: log-probabilities agree to ~1e-8); the
    # objective is then checked to 1e-10 on the very log-probabilities the dense forward used
    dense.double()
    plain.double()
    cfg = dense.config
    seen = {}

    def objective(config, *tensors):
        seen["inputs"] = tensors
        return real_objective(config, *tensors)

    real_objective = dense_reference._objective
    monkeypatch.setattr(dense_reference, "_objective", objective)
    L, pad = 9, 2
    x = random_text(1, L, seed=5)
    mask = torch.ones_like(x)
    mask[0, :pad] = 0  # left padding
    labels = x.masked_fill(mask == 0, -100)
    labels[0, 5] = -100  # an ignored token inside the text
    dense.train()
    loss, metrics, thoughts = dense(x, mask, labels, generator=torch.Generator().manual_seed(0))
    base_logp, mixed_logp, thought_logp, valid = seen["inputs"]
    text = x[0, pad:]
    kept = (labels[0, pad:] != -100).tolist()
    # its own targets: x_{i+1+s} inside the text and not ignored, from real positions only (the
    # last padding position does not predict the first token), the n thoughts' rows adjacent
    expected = valid_from_labels([(labels[0] != -100).tolist()], A)[0]
    expected = [[ok and bool(mask[0, i]) for ok in row] for i, row in enumerate(expected)]
    assert valid.tolist() == [expected] * n
    # position by position: the base prediction, the thought tokens at temperature T, the mixed ones
    for r in range(n):
        base_hidden, base_logits = run_plain(dense, plain, text)
        for i in range(len(text) - 1):
            col = pad + i
            if kept[i + 1]:
                want = torch.log_softmax(base_logits[i], -1)[text[i + 1]]
                torch.testing.assert_close(base_logp[r, col], want, atol=1e-6, rtol=0)
            thought = thoughts[0, r, col]
            hidden, logits = run_plain(dense, plain, thought_sequence(dense, text, i, thought, A))
            for j in range(K):  # the query at START + j predicts t_{j+1}
                want = torch.log_softmax(logits[i + 1 + j] / T, -1)[thought[j]]
                torch.testing.assert_close(thought_logp[r, col, j], want, atol=1e-6, rtol=0)
            end = i + 1 + K + 1
            for s in range(A):
                if i + 1 + s >= len(text) or not kept[i + 1 + s]:
                    continue
                with torch.no_grad():
                    h = base_hidden[i + s]
                    w = dense.model.mixing_head.weight(h, hidden[end + s])
                    mixed = dense.model.logits(h + w * (hidden[end + s] - h))
                want = torch.log_softmax(mixed, -1)[text[i + 1 + s]]
                torch.testing.assert_close(mixed_logp[r, col, s], want, atol=1e-6, rtol=0)
    ref_loss, ref_metrics, _, _ = hand_objective(
        n, baseline, drop, base_logp.tolist(), mixed_logp.tolist(), thought_logp.tolist(), valid.tolist(),
        cfg.base_loss_weight, cfg.mixed_loss_weight, cfg.policy_loss_weight)
    torch.testing.assert_close(loss.item(), ref_loss, atol=1e-10, rtol=1e-10)
    assert metrics.keys() <= ref_metrics.keys() and {"base_nll", "policy_loss", "mean_reward"} <= metrics.keys()
    for name, value in metrics.items():
        torch.testing.assert_close(value.item(), ref_metrics[name], atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    assert ref_metrics["policy_loss"] != 0 and 0 < ref_metrics["positive_reward_fraction"] < 1


def test_dense_reference_has_its_own_weights():
    model = make_model("llama")
    dense = DenseQuietStar(model)
    ours = dict(model.named_parameters())
    for name, p in dense.model.named_parameters():
        assert p.data_ptr() != ours[name].data_ptr()
        assert torch.equal(p, ours[name])
    assert dense.model.lm.config._attn_implementation == "sdpa"


def test_dense_reference_refuses_softcapping():
    with pytest.raises(NotImplementedError, match="softcapping"):
        DenseQuietStar(make_model("gemma2"))


def test_live_tensor_bytes_hand_counted():
    weight = torch.ones(100, 100)  # 40,000 bytes, held before: not counted
    with train_step.LiveTensorBytes([weight]) as tracker:
        a = torch.empty(1000)                 # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 bytes
        view = a[10:]                          # a view: no new storage
        weight.mul_(2)                         # in place on a known tensor: nothing new
        del a, view
        c = torch.empty(2000)                  # 8,000 bytes, after a (4,000) was freed
        live_at_end = tracker.live
    assert tracker.peak == 12_000
    assert live_at_end == 12_000  # b and c
    del b, c
    assert tracker.live == 0


def test_live_tensor_bytes_sees_backward_and_checkpointing():
    """The tracker sees the forward, the backward and checkpoint recomputation: each extra layer
    adds exactly the bytes it keeps for the backward (hand-counted)."""
    w_in = torch.randn(64, 512, requires_grad=True)
    w_out = torch.randn(512, 64, requires_grad=True)
    x = torch.randn(256, 64)
    narrow, wide = 256 * 64 * 4, 256 * 512 * 4  # bytes of a layer's input and inner activation

    def layer(h):
        return torch.tanh(h @ w_in) @ w_out

    def peak(layers: int, checkpointed: bool) -> int:
        with train_step.LiveTensorBytes([w_in, w_out, x]) as tracker:
            h = x
            for _ in range(layers):
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False) if checkpointed else layer(h)
            h.sum().backward()
        w_in.grad = w_out.grad = None
        return tracker.peak

    # Plain: a layer keeps its input (for h @ w_in) and its tanh output (for tanh and @ w_out).
    assert (peak(6, False) - peak(2, False)) / 4 == narrow + wide
    # Checkpointed: a layer keeps only its input; the inner activations live one layer at a time.
    assert (peak(6, True) - peak(2, True)) / 4 == narrow


def test_train_step_worker_measures_each_method():
    base = dict(L=32, k=2, ahead=2, n=2, batch=1, hidden=32, layers=1, heads=2, kv_heads=1, vocab=200,
                reps=1, threads=1)
    specs = [dict(base, method="ours"), dict(base, method="ours", checkpointing=True),
             dict(base, method="ideal"), dict(base, method="all-passes", reps=0),
             dict(base, method="dense"), dict(base, method="plain"),
             dict(base, method="ours", model="mistral", chunk=0)]
    ours, ours_ckpt, ideal, all_passes, dense, plain, mistral = train_step.worker(specs)
    for r in (ours, ours_ckpt, ideal, dense, plain, mistral):
        assert r["time_s"] > 0 and r["peak_bytes"] > 0 and r["peak_rss_bytes"] > 2 ** 20
    assert all_passes["time_s"] is None  # reps 0: memory only
    assert ours_ckpt["peak_bytes"] < ours["peak_bytes"]  # checkpointing saves memory
    # F = k + A + 2 = 6 passes alive at once against one at a time.
    assert all_passes["peak_bytes"] > 3 * ideal["peak_bytes"]


def test_run_worker_reads_the_last_json_line_or_names_the_failure(tmp_path):
    """A fresh process gets ``--worker`` and the arguments; its last JSON line is the result, a crash
    is named by stderr's last line, a hang by "timeout"."""
    script = tmp_path / "worker.py"
    script.write_text("import json, sys, time\n"
                      "assert sys.argv[1] == '--worker'\n"
                      "if sys.argv[2] == 'sleep': time.sleep(30)\n"
                      "if sys.argv[2] == 'crash': raise SystemExit('worker broke')\n"
                      "print('{\"first\": 1}'); print('progress'); print(json.dumps({'args': sys.argv[2:]}))\n")
    assert train_step.run_worker(str(script), "a", '{"k": 2}', timeout=60) == {"args": ["a", '{"k": 2}']}
    assert train_step.run_worker(str(script), "crash", timeout=60) == {"error": "worker broke"}
    assert train_step.run_worker(str(script), "sleep", timeout=0.5) == {"error": "timeout"}


def test_memory_linear_in_length_and_below_the_dense_masks():
    """Deterministic memory (live tensor bytes, not timings) of one training step, k = 4, A = 4,
    n = 2 (F = 10 passes), batch 1, a 1-layer Llama (hidden 16, vocab 64), at L = 64 and 128.

    Theory: quietstar keeps nothing of size L x L per pass (the text part's scores are never
    materialised, the own-thought part is L x P), so its peak is linear in L at fixed F. The
    dense reference keeps, on top of the activations both need, every pass's additive mask
    [n, L, (p+1) L] in float32 for the SDPA backward: M = 4 n L^2 F (F + 1) / 2 bytes (1.8 MB at
    L = 64, 7.2 MB at 128). Asserted with margin: ours(128) <= 2.02 ours(64) (measured 2.000),
    dense - ours >= M / 2 at both lengths (measured 0.91 M), hence dense / ours >= 1.5 at
    L = 128 (measured 2.12; 1.56 at L = 64)."""
    k, A, n = 4, 4, 2
    F = k + A + 2
    base = dict(k=k, ahead=A, n=n, batch=1, hidden=16, layers=1, heads=2, kv_heads=1, vocab=64,
                reps=0, threads=1)
    lengths = (64, 128)
    specs = [dict(base, method=m, L=L) for L in lengths for m in ("ours", "dense")]
    peaks = [r["peak_bytes"] for r in train_step.worker(specs)]
    ours, dense = dict(zip(lengths, peaks[0::2])), dict(zip(lengths, peaks[1::2]))
    assert ours[128] <= 2.02 * ours[64], "quietstar's memory is no longer linear in L"
    for L in lengths:
        masks = 4 * n * L * L * F * (F + 1) // 2
        assert dense[L] - ours[L] >= masks / 2, (L, dense[L], ours[L], masks)
    assert dense[128] >= 1.5 * ours[128]


def test_gpu_script_runs_tiny_on_cpu(capsys):
    assert gpu.main(["--tiny", "--device", "cpu", "--models", "llama"]) == 0
    out = capsys.readouterr().out
    for method in ("ours", "ideal", "dense"):
        for L in (16, 32):
            assert f"| {method} | 2 | {L} |" in out
    assert "Longest L that fitted (of those tried):\n" + "".join(
        f"  {method} k=2: 32 (every length tried fitted)\n" for method in ("ours", "ideal", "dense")) in out
    # The thinking generation really ran (not "generation skipped"), with both speeds measured.
    assert "generation skipped" not in out
    assert re.search(r"^Generation \(batch 1, prompt 16, 4 new tokens, greedy\): thinking k=2: "
                     r"\d+\.\d tokens/s; base generate: \d+\.\d tokens/s \(\d+\.\dx; ", out, re.M)


def test_train_flops_hand_computed():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=3,
                                   head_dim=4)
    # 6 * 100 params + attention 6 * 3 layers * 2 heads * 4 dims * 10 keys, per token; 2 x 10 x 5.
    assert gpu.train_flops(cfg, 100, rows=2, length=10, passes=5) == (600 + 6 * 3 * 2 * 4 * 10) * 100


# ---------------------------------------------------------------------------- GPU attention path
# quietstar.method.attention._sdpa_thought_attention is what GPUs run (the memory-linear path that makes
# the long-L rows of benchmarks/gpu.py possible); its numerics are device-independent, so they are
# checked here on CPU against the plain tensor-op path.
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("query_passes", [(0,), (3,), (0, 1, 2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_thought_attention_equals_general_with_gradients(padded, query_passes, dtype):
    from quietstar.method.attention import (
        PassKeys,
        ThoughtLayout,
        _general_thought_attention,
        _sdpa_thought_attention,
    )

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 9, 8
    Qp, P = len(query_passes), max(query_passes)
    q = torch.randn(B, H, Qp * L, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, (P + 1) * L, D, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, (P + 1) * L, D, dtype=torch.float64, generator=g, requires_grad=True)
    valid = torch.ones(B, L, dtype=torch.bool)
    if padded:
        valid[1, :3] = False
    layout = ThoughtLayout(L, query_passes, valid, (valid.long().cumsum(-1) - 1).clamp(min=0),
                           has_padding=padded)
    weights = torch.randn(B, Qp * L, H, D, dtype=torch.float64, generator=g)
    real = valid.repeat(1, Qp)[:, :, None, None]  # padded queries' outputs are unused
    results = []
    for fn, dt in ((_general_thought_attention, torch.float64), (_sdpa_thought_attention, dtype)):
        keys = PassKeys()
        keys.add(k.to(dt).split(L, 2), v.to(dt).split(L, 2))
        out, _ = fn(q.to(dt), keys, layout, D ** -0.5)
        grads = torch.autograd.grad((out.double() * weights * real).sum(), (q, k, v))
        results.append((out.double() * real, *grads))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)


# ------------------------------------------------------------------ rlp_step.py
@pytest.mark.parametrize("vocab_size", [None, 320])  # 320: START / END beyond the LM head, added rows
def test_rlp_engine_way_computes_the_native_objective(vocab_size):
    """The engines' way (prompts, the plain model's ``generate``, scoring per position) and the
    native rollout give the same RLP rewards, loss and gradients on the same thoughts: what the
    benchmark times is the same work."""
    S, G, k, L = 3, 3, 4, 20
    native, engine = rlp_step.build_pair(make_lm("llama", vocab_size=vocab_size), make_tokenizer(),
                                         rlp_step.rlp_config(k, G))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # an EMA copy apart from the LM, so the rewards are not trivial
        for (name, ours), (_, theirs) in zip(native.ema_lm.named_parameters(), engine.ema.named_parameters()):
            if "layers." in name:
                noise = torch.randn(ours.shape, generator=g) * 0.05
                ours.add_(noise)
                theirs.add_(noise)
    ids = random_text(1, L, seed=3)[0]
    positions = rlp_step.chosen_positions(L, S)
    torch.manual_seed(0)
    thoughts = engine.sample(ids, positions)                                   # [S, G, k]
    assert thoughts.shape == (S, G, k)
    assert not torch.isin(thoughts, torch.tensor([native.start_id, native.end_id])).any()
    theirs = engine.loss_backward(ids, positions, thoughts)

    replay = torch.zeros(1, G, L, k, dtype=torch.long)
    replay[0, :, positions] = thoughts.transpose(0, 1)
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, positions] = True
    native.train()
    out = native(ids[None], thought_ids=replay, thought_positions=mask)
    out.loss.backward()
    assert abs(theirs["mean_reward"]) > 1e-3  # the rewards are not trivial ...
    torch.testing.assert_close(out.metrics["mean_reward"].item(), theirs["mean_reward"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss.item(), theirs["loss"], atol=1e-6, rtol=0)

    plain = dict(engine.lm.named_parameters())
    meta = [native.start_id, native.end_id]
    checked = 0
    for name, p in native.lm.named_parameters():
        want = p.grad
        got = plain[name].grad[:want.shape[0]].clone()
        if want.shape[0] > max(meta):  # START / END rows inside the matrix: their vectors are the embedding's
            keep = torch.ones(want.shape[0], dtype=torch.bool)
            keep[meta] = False
            got, want = got[keep], want[keep]
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item() + 1e-9, rtol=0, msg=name)
        checked += 1
    assert checked >= 10
    vectors = native.get_input_embeddings()  # stored / lr_multiplier: the true vectors' gradient
    want = vectors.scaled_vectors.grad / vectors.lr_multiplier
    got = engine.lm.get_input_embeddings().weight.grad[meta]
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_rlp_step_script_prints_its_table(monkeypatch, capsys):
    monkeypatch.setattr(rlp_step, "run_worker", lambda script, spec, timeout: rlp_step.worker(json.loads(spec)))
    assert rlp_step.main(["--thought-tokens", "3", "--length", "24", "--positions", "2", "--group", "2",
                          "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab", "200",
                          "--reps", "1"]) == 0
    row = re.search(r"^\| 3 \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+\.\d\d) \| (\d+\.\d) \| (\d+\.\d) "
                    r"\| (\d+\.\d\d) \|$", capsys.readouterr().out, re.M)
    assert row and float(row[6]) > 0 and float(row[7]) > 0


def test_distill_step_script_prints_its_table(monkeypatch, capsys):
    """The three steps run; the cache holds 8k + 4 bytes a token and frees the teacher's weights."""
    results = []

    def run_here(script, spec, timeout):
        results.append(distill_step.worker(json.loads(spec)))
        return results[-1]

    monkeypatch.setattr(distill_step, "run_worker", run_here)
    assert distill_step.main(["--thought-tokens", "2", "--length", "24", "--batch", "2", "--hidden", "32",
                              "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab", "200", "--reps", "1",
                              "--top-k", "8"]) == 0
    assert re.search(r"^\| 2 (\| [\d.]+ ){11}\|$", capsys.readouterr().out, re.M)
    r = results[0]
    assert r["cache_bytes_per_token"] == pytest.approx(8 * 8 + 4, rel=0.02)  # 8 ids x (4 + 4 bytes) + rest, + headers
    assert r["fly"]["held_bytes"] > r["cached"]["held_bytes"] >= r["plain"]["held_bytes"]
    assert all(r[name]["time_s"] > 0 and r[name]["peak_bytes"] > 0 for name in ("fly", "cached", "plain"))
