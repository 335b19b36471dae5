"""The benchmarks measure what they claim: the dense reference computes the same numbers as
quietstar, the memory tracker counts bytes correctly, and the scripts run end to end."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import make_model, random_text

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gpu
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
             dict(base, method="dense")]
    ours, ours_ckpt, ideal, all_passes, dense = train_step.worker(specs)
    for r in (ours, ours_ckpt, ideal, dense):
        assert r["time_s"] > 0 and r["peak_bytes"] > 0
    assert all_passes["time_s"] is None  # reps 0: memory only
    assert ours_ckpt["peak_bytes"] < ours["peak_bytes"]  # checkpointing saves memory
    # F = k + A + 2 = 6 passes alive at once against one at a time.
    assert all_passes["peak_bytes"] > 3 * ideal["peak_bytes"]


def test_gpu_script_runs_tiny_on_cpu(capsys):
    assert gpu.main(["--tiny", "--device", "cpu", "--models", "llama"]) == 0
    out = capsys.readouterr().out
    for method in ("ours", "ideal", "dense"):
        for L in (16, 32):
            assert f"| {method} | 2 | {L} |" in out
    assert "Longest L that fitted" in out
    assert "Generation (" in out or "generation skipped" in out


def test_train_flops_hand_computed():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=3,
                                   head_dim=4)
    # 6 * 100 params + attention 6 * 3 layers * 2 heads * 4 dims * 10 keys, per token; 2 x 10 x 5.
    assert gpu.train_flops(cfg, 100, rows=2, length=10, passes=5) == (600 + 6 * 3 * 2 * 4 * 10) * 100


# ---------------------------------------------------------------------------- GPU attention path
# quietstar.attention._sdpa_thought_attention is what GPUs run (the memory-linear path that makes
# the long-L rows of benchmarks/gpu.py possible); its numerics are device-independent, so they are
# checked here on CPU against the plain tensor-op path.
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("query_passes", [(0,), (3,), (0, 1, 2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_thought_attention_equals_general_with_gradients(padded, query_passes, dtype):
    from quietstar.attention import (
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
