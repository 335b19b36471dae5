"""vocab.VocabHead: the chunked log-probabilities and sampler equal the full-logits computation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quietstar.method.sampling import sample
from quietstar.method.selection import logits_entropy
from quietstar.method.vocab import VocabHead

V, D = 50, 6
MASKED = torch.tensor([3, 17])  # meta tokens inside the vocabulary


def toy(dtype=torch.float64, bias=True, seed=0, rows=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*rows, D, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, rows, generator=g)
    targets[targets == 3] = 4  # targets are text tokens, never a masked id
    targets[targets == 17] = 18
    return hidden, weight, b, targets, g


def reference_logprobs(hidden, weight, bias, targets, temperature, softcap):
    """The straightforward way: all logits, masked, log_softmax, gather."""
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    z = z.index_fill(-1, MASKED, float("-inf")).to(torch.promote_types(z.dtype, torch.float32))
    return torch.log_softmax(z / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)


def grads(value, upstream, inputs):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad((value * upstream.to(value.dtype)).sum(), inputs)


class Project(torch.nn.Module):
    """A head module computing h W^T + b from given tensors (VocabHead's ZeRO-3 path)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.w, self.b = weight, bias

    def forward(self, h):
        return F.linear(h, self.w, self.b)


@pytest.mark.parametrize("through_module", [False, True])
@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 100])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (3.0, None), (1.0, 4.0), (3.0, 4.0)])
def test_logprobs_equal_full_logits_with_gradients(chunk, temperature, softcap, through_module):
    hidden, weight, bias, targets, g = toy()
    upstream = torch.randn(targets.shape, generator=g, dtype=torch.float64)
    upstream[1, :2] = 0  # padding rows: no gradient flows back from them
    head = VocabHead(weight, bias, softcap, MASKED, chunk, Project(weight, bias) if through_module else None)
    ours = head.logprobs(hidden, targets, temperature)
    reference = reference_logprobs(hidden, weight, bias, targets, temperature, softcap)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
    ours_grads = grads(ours, upstream, (hidden, weight, bias))
    for a, b in zip(ours_grads, grads(reference, upstream, (hidden, weight, bias)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # the masked rows of W are never predicted, so they get no gradient
    assert (ours_grads[1][MASKED] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_in_low_precision_track_cross_entropy(dtype):
    """float32 math on the chunk's logits, whatever the weights' dtype, as cross-entropy does."""
    hidden, weight, _, targets, g = toy(dtype, bias=False)
    upstream = torch.randn(targets.shape, generator=g)
    ours = VocabHead(weight, None, None, MASKED[:0], 4).logprobs(hidden, targets)
    assert ours.dtype == torch.float32
    logits = F.linear(hidden, weight).float()
    reference = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(grads(ours, upstream, (hidden, weight)), grads(reference, upstream, (hidden, weight))):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_gradients_flow_through_the_mixing_weight():
    """The mixed prediction mixes hidden states: its chunked log-probabilities give w, both
    states and W the gradients of the full logits'."""
    h_base, weight, bias, targets, g = toy(seed=1)
    h_thought = torch.randn(h_base.shape, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(h_base.shape[:-1], generator=g, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(targets.shape, generator=g, dtype=torch.float64)
    inputs = (h_base, h_thought, w, weight, bias)

    def mixed():
        return h_base + w[..., None] * (h_thought - h_base)

    ours = VocabHead(weight, bias, None, MASKED, 3).logprobs(mixed(), targets)
    reference = reference_logprobs(mixed(), weight, bias, targets, 1.0, None)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads(ours, upstream, inputs), grads(reference, upstream, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("through_module", [False, True])
@pytest.mark.parametrize("chunk", [0, 3, 7])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_sample_equals_sampling_sample_on_full_logits(chunk, temperature, through_module):
    """Same generator, same tokens as ``sampling.sample`` on all logits; the log-probabilities
    returned beside them equal the full logits' at their own temperature, gradients included."""
    hidden, weight, bias, _, g = toy(torch.float32, rows=(4, 9))
    head = VocabHead(weight, bias, None, MASKED, chunk, Project(weight, bias) if through_module else None)
    tokens, logp = head.sample(hidden, temperature, torch.Generator().manual_seed(5), logprob_temperature=3.0)
    with torch.no_grad():
        full = head.logits(hidden).view(-1, V)
    expected = sample(full, temperature, torch.Generator().manual_seed(5)).view(4, 9)
    assert torch.equal(tokens, expected)
    assert not torch.isin(tokens, MASKED).any()
    reference = reference_logprobs(hidden, weight, bias, tokens, 3.0, None)
    torch.testing.assert_close(logp, reference, atol=1e-6, rtol=1e-6)
    upstream = torch.randn(tokens.shape, generator=g)
    for a, b in zip(grads(logp, upstream, (hidden, weight, bias)), grads(reference, upstream, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # without a log-probability temperature: the same tokens, nothing else
    alone, none = head.sample(hidden, temperature, torch.Generator().manual_seed(5))
    assert torch.equal(alone, tokens) and none is None


def test_no_vocabulary_sized_tensor_outlives_a_chunk():
    """Forward and backward of 64 rows in chunks of 8 never hold logits of more than a few
    chunks at once; all rows at once (chunk 0) do hold all of them."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from train_step import LiveTensorBytes

    V_big, rows, chunk = 4096, 64, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, D, generator=g).requires_grad_()
    weight = torch.randn(V_big, D, generator=g).requires_grad_()
    targets = torch.randint(0, V_big, (rows,), generator=g)
    peaks = {}
    for c in (0, chunk):
        with LiveTensorBytes((hidden, weight)) as tracker:
            VocabHead(weight, None, None, MASKED[:0], c).logprobs(hidden, targets).sum().backward()
        peaks[c] = tracker.peak - weight.numel() * 4  # the weight's gradient is not a logit
    one_chunk = chunk * V_big * 4
    assert peaks[chunk] <= 3 * one_chunk
    assert peaks[0] >= rows * V_big * 4


@pytest.mark.parametrize("through_module", [False, True])
@pytest.mark.parametrize("chunk", [0, 1, 3, 100])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_entropy_equals_full_logits(chunk, softcap, through_module):
    """VocabHead.entropy (thought_selection="entropy"), a chunk of rows at a time, equals the
    entropy of the full masked logits; the masked ids add nothing; no gradient."""
    hidden, weight, bias, _, _ = toy()
    head = VocabHead(weight, bias, softcap, MASKED, chunk, Project(weight, bias) if through_module else None)
    expected = logits_entropy(head.logits(hidden))
    got = head.entropy(hidden)
    assert got.shape == hidden.shape[:-1] and not got.requires_grad
    torch.testing.assert_close(got, expected, check_dtype=False)
