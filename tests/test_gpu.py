"""The CUDA path (SDPA thought attention, bf16, the GPU benchmark), run where a GPU is present.

``pytest -m gpu`` runs exactly these; without CUDA they skip (the one kind of skip CI allows,
see tests/ci_skips.py). Their CPU twins are in test_rollout.py and test_benchmarks.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import make_lm, make_tokenizer, random_text
from quietstar import QuietStarConfig, QuietStarForCausalLM
from test_rollout import A, K, assert_close_finite, bf16_error_in_spreads, mix_logits, perturb_head

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA_FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2"]


@pytest.fixture(autouse=True)
def exact_matmuls():
    """fp32 comparisons need full-precision products (TF32 would round to 10 bits)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def wrap_on_cuda(family, **kw):
    lm = make_lm(family)
    reference = make_lm(family).cuda()  # same seed: the same weights, ordinary attention
    config = QuietStarConfig(sampled_thought_tokens=K, ahead_tokens=A, **kw)
    return QuietStarForCausalLM.from_base(lm, make_tokenizer(), config).cuda(), reference


@pytest.mark.parametrize("family", CUDA_FAMILIES)
def test_parallel_equals_sequential_on_cuda_fp32(family):
    """The SDPA thought attention equals the plain model run position by position (atol 1e-4,
    as on CPU), left padding included."""
    model, reference = wrap_on_cuda(family)
    perturb_head(model)
    B, L = 2, 11
    x = random_text(B, L, seed=3).cuda()
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    thoughts = random_text(B * L, K, seed=4).view(B, L, K).cuda()
    with torch.no_grad():
        scores = model.score_thoughts(x, thoughts, mask)
    emb = model.get_input_embeddings()
    start, end = torch.tensor([model.start_id]).cuda(), torch.tensor([model.end_id]).cuda()
    for b in range(B):
        columns = mask[b].bool().nonzero().flatten()
        text = x[b, columns]
        with torch.no_grad():
            plain = reference(inputs_embeds=emb(text[None])).logits[0]
        assert_close_finite(scores.base_logits[b, columns].cpu(), plain.cpu(), model)
        for i, col in enumerate(columns.tolist()):
            seq = torch.cat([text[:i + 1], start, thoughts[b, col], end, text[i + 1:i + A]])
            with torch.no_grad():
                logits = reference(inputs_embeds=emb(seq[None])).logits[0]
            for s in range(min(A, len(columns) - i)):
                after = logits[i + 2 + K + s]
                assert_close_finite(scores.thought_logits[b, col, s].cpu(), after.cpu(), model)
                w = scores.mixing_weight[b, col, s]
                expected = mix_logits(model, plain[i + s], after, w)
                assert_close_finite(scores.mixed_logits[b, col, s].cpu(), expected.cpu(), model)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_bf16_on_cuda_tracks_fp32(family):
    """bf16 scoring on the GPU within a tenth of the logits' spread of fp32 (CPU: 0.022)."""
    model, _ = wrap_on_cuda(family)
    x = random_text(1, 10, seed=9).cuda()
    thoughts = random_text(10, K, seed=10).view(1, 10, K).cuda()
    with torch.no_grad():
        assert bf16_error_in_spreads(model, x, thoughts) < 0.1


def test_training_step_on_cuda_equals_cpu():
    """One training forward and backward on CUDA gives the CPU's loss and gradients (fp32) for
    the same given thoughts."""
    results = []
    for device in ("cpu", "cuda"):
        model = QuietStarForCausalLM.from_base(make_lm("llama"), make_tokenizer(),
                                               QuietStarConfig(sampled_thought_tokens=K, ahead_tokens=A,
                                                               policy_loss_weight=10.0)).to(device)
        perturb_head(model)
        x = random_text(2, 9, seed=12).to(device)
        thoughts = random_text(2 * 2 * 9, K, seed=13).view(2, 2, 9, K).to(device)
        out = model(x, thought_ids=thoughts)
        out.loss.backward()
        results.append((out.loss.item(), [p.grad.cpu() for p in model.parameters() if p.grad is not None]))
    (loss_cpu, grads_cpu), (loss_gpu, grads_gpu) = results
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-5)
    assert len(grads_cpu) == len(grads_gpu)
    for a, b in zip(grads_cpu, grads_gpu):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.float32, True)])
def test_chunked_vocabulary_on_cuda_equals_full_logits(dtype, autocast):
    """vocab.VocabHead on CUDA, in chunks (recomputed in the backward) and all at once, equals
    log_softmax of all logits (the CPU twin: test_vocab.py), values and gradients; under bf16
    autocast over float32 weights too (the GPU benchmark's setting). There is no Liger path to
    compare: its fused linear cross-entropy cannot mask the meta tokens' logits (docs/architecture.md)."""
    from test_vocab import MASKED, reference_logprobs, toy

    from quietstar.method.vocab import VocabHead

    hidden, weight, bias, targets, g = toy(dtype, rows=(3, 70))
    upstream = torch.randn(targets.shape, generator=g).cuda()
    hidden, weight, bias = (t.detach().cuda().requires_grad_() for t in (hidden, weight, bias))
    targets = targets.cuda()
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        reference = reference_logprobs(hidden, weight, bias, targets, 3.0, None)
        expected = torch.autograd.grad((reference * upstream).sum(), (hidden, weight, bias))
        for chunk in (0, 64):
            head = VocabHead(weight, bias, None, MASKED.cuda(), chunk)
            ours = head.logprobs(hidden, targets, 3.0)
            got = torch.autograd.grad((ours * upstream).sum(), (hidden, weight, bias))
            tol = 1e-5 if dtype == torch.float32 and not autocast else 2e-2
            torch.testing.assert_close(ours, reference.float(), atol=tol, rtol=tol)
            for a, b in zip(got, expected):
                assert a.dtype == b.dtype
                torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_training_step_on_cuda_chunked_equals_unchunked():
    """On CUDA a training step with the vocabulary in chunks equals the one with all logits kept
    (fp32, the same given thoughts: CUDA kernels may round a chunk's logits differently from
    all rows', so a sampled token could flip on a near tie)."""
    thoughts = random_text(2 * 2 * 9, K, seed=13).view(2, 2, 9, K).cuda()
    results = []
    for chunk in (0, 5):
        model = QuietStarForCausalLM.from_base(make_lm("llama"), make_tokenizer(),
                                               QuietStarConfig(sampled_thought_tokens=K, ahead_tokens=A,
                                                               policy_loss_weight=10.0,
                                                               loss_chunk_tokens=chunk)).cuda()
        perturb_head(model)
        out = model(random_text(2, 9, seed=12).cuda(), thought_ids=thoughts)
        out.loss.backward()
        results.append((out.loss.item(), [p.grad for p in model.parameters() if p.grad is not None]))
    (loss_all, grads_all), (loss_chunked, grads_chunked) = results
    assert loss_chunked == pytest.approx(loss_all, rel=1e-5)
    for a, b in zip(grads_all, grads_chunked, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_gpu_benchmark_runs_tiny_on_cuda(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu

    assert gpu.main(["--tiny", "--device", "cuda", "--models", "llama"]) == 0
    assert "| ours |" in capsys.readouterr().out
