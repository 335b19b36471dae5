"""The teacher cache of ``quietstar distill --teacher-cache``: the top-k KL against a hand-written
reference, k = V equal to the on-the-fly loss, exact resume from a sharded cache, a cache grown
for a resumed run's larger max_steps (and an interrupted growth), and the refusals of a cache made
for another run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import distill_config, exported_weights, make_model, thinking_teacher
from quietstar.method.distillation import teacher_top_k, top_k_distillation_kl
from quietstar.training import teacher_cache
from quietstar.training.distill import distill
from quietstar.utils.errors import QuietStarInputError


@pytest.mark.parametrize("family, chunk, k, temperature", [("llama", 5, 7, 1.0), ("llama", 0, 20, 2.0),
                                                           ("gemma2", 4, 3, 0.7), ("llama", 4, None, 1.0)])
def test_top_k_kl_equals_hand_written_reference(family, chunk, k, temperature):
    """teacher_top_k = topk of the full log-softmax, rest = log(1 - their mass); the KL on K and the
    rest bucket, value and gradients (hidden states, head), = the formula written on full
    distributions; k = V (None) gives the full KL."""
    teacher, student = make_model(family, seed=0, loss_chunk_tokens=chunk), make_model(family, seed=1,
                                                                                        loss_chunk_tokens=chunk)
    t_head, s_head = teacher.vocab_head(), student.vocab_head().unmasked()
    g = torch.Generator().manual_seed(0)
    h_t = torch.randn(11, 32, generator=g)
    vocab = teacher.logits(h_t).shape[-1]
    k = vocab if k is None else k
    ids, logprobs, rest = teacher_top_k(t_head, h_t, k, temperature)
    logp_full = torch.log_softmax(teacher.logits(h_t) / temperature, -1)
    top = logp_full.topk(k, -1)
    assert torch.equal(ids, top.indices) and torch.allclose(logprobs, top.values)
    mass_off = 1 - logprobs.exp().sum(-1)
    if k < vocab:
        torch.testing.assert_close(rest.exp(), mass_off, rtol=1e-4, atol=1e-6)
    else:
        assert torch.isneginf(rest).all()

    h = torch.randn(11, 32, generator=g, requires_grad=True)
    kl = top_k_distillation_kl(s_head, h, ids.int(), logprobs, rest, temperature)
    kl.sum().backward()
    grads = (h.grad.clone(), student.lm.get_output_embeddings().weight.grad.clone())
    student.zero_grad()

    h_ref = h.detach().clone().requires_grad_(True)
    q = torch.softmax(s_head.logits(h_ref).double() / temperature, -1)       # [N, V]
    p = logprobs.double().exp()
    q_k = q.gather(1, ids)
    ref = torch.where(p > 0, p * (p.log() - q_k.log()), 0).sum(-1)
    if k < vocab:
        p_rest, q_rest = 1 - p.sum(-1), 1 - q_k.sum(-1)
        ref = ref + p_rest * (p_rest.log() - q_rest.log())
    ref = ref * temperature ** 2
    ref.sum().backward()
    torch.testing.assert_close(kl.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), h_ref.grad.double(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(grads[1].double(), student.lm.get_output_embeddings().weight.grad.double(),
                               rtol=1e-3, atol=1e-5)
    if k == vocab:  # the full KL (the on-the-fly loss)
        from quietstar.method.distillation import distillation_kl
        torch.testing.assert_close(kl, distillation_kl(s_head, h.detach(), t_head, h_t, temperature),
                                   rtol=1e-5, atol=1e-5)


def test_cache_with_k_equal_to_the_vocabulary_gives_the_on_the_fly_run(teacher_dir, tmp_path):
    vocab = make_model().lm.get_output_embeddings().weight.shape[0]
    fly = distill(distill_config(teacher_dir, tmp_path / "fly", max_steps=2))
    cached = distill(distill_config(teacher_dir, tmp_path / "cached", max_steps=2,
                                    teacher_cache=str(tmp_path / "cache"), cache_top_k=vocab))
    for key in ("loss", "kl", "student_nll", "grad_norm"):
        assert cached.metrics[key] == pytest.approx(fly.metrics[key], rel=1e-4, abs=1e-5), key
    a, b = exported_weights(tmp_path / "fly"), exported_weights(tmp_path / "cached")
    for name in a:  # Adam divides by sqrt(v): float rounding of near-zero gradients moves a weight ~1e-5
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4)
    index = json.loads((tmp_path / "cache" / teacher_cache.INDEX_NAME).read_text())
    assert index["made_from"]["top_k"] == vocab and index["made_from"]["steps"] == 2


def test_resume_from_a_sharded_cache_is_exact_and_a_foreign_cache_is_refused(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "SHARD_BYTES", 1)  # one step per shard: reads cross shard files
    cache = str(tmp_path / "cache")
    whole = distill(distill_config(teacher_dir, tmp_path / "whole", teacher_cache=cache, cache_top_k=8))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors", teacher_cache.INDEX_NAME]
    shard = load_file(tmp_path / "cache" / "shard-00001.safetensors")
    assert shard["ids"].dtype == torch.int32 and shard["ids"].shape == (2 * 15, 8)  # B x (L - 1) rows
    assert shard["logprobs"].shape == (30, 8) and shard["rest"].shape == (30,)
    assert whole.metrics["kl"] > 0

    first = distill(distill_config(teacher_dir, tmp_path / "split", teacher_cache=cache, cache_top_k=8, max_steps=1))
    assert first.step == 1
    rest = distill(distill_config(teacher_dir, tmp_path / "split", teacher_cache=cache, cache_top_k=8, resume="latest"))
    assert rest.metrics == {**whole.metrics, "step_time_s": rest.metrics["step_time_s"]}
    a, b = exported_weights(tmp_path / "whole"), exported_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)

    base = distill_config(teacher_dir, tmp_path / "other", teacher_cache=cache, cache_top_k=8)
    for change, words in [({"temperature": 2.0}, "temperature 1.0, this run has 2.0"),
                          ({"cache_top_k": 4}, "top_k 8, this run has 4"),
                          ({"seed": 1}, "seed 0, this run has 1")]:
        with pytest.raises(QuietStarInputError, match=words):
            distill(replace(base, **change))
    other_teacher = tmp_path / "teacher2"
    thinking_teacher(seed=5).save_pretrained(other_teacher)
    with pytest.raises(QuietStarInputError, match="teacher_sha256"):
        distill(replace(base, teacher=str(other_teacher)))
    with pytest.raises(QuietStarInputError, match="cache_top_k 100000 exceeds"):
        distill(replace(base, teacher_cache=str(tmp_path / "new"), cache_top_k=100000))


def test_command_line_writes_and_reads_the_cache(teacher_dir, tmp_path, capsys):
    from quietstar.cli.main import main

    args = ["distill", "--teacher", str(teacher_dir), "--seq-len", "16", "--batch-size", "2", "--max-steps", "1",
            "--device", "cpu", "--teacher-cache", str(tmp_path / "cache"), "--cache-top-k", "5"]
    assert main(args + ["--output-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--output-dir", str(tmp_path / "b")]) == 0  # reads the cache the first wrote
    assert json.loads((tmp_path / "cache" / teacher_cache.INDEX_NAME).read_text())["made_from"]["top_k"] == 5
    a, b = exported_weights(tmp_path / "a"), exported_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    help_text = capsys.readouterr().out
    assert "--teacher-cache" in help_text and "--cache-top-k" in help_text and "--curriculum" in help_text


def test_a_cache_of_other_text_is_refused(teacher_dir, tmp_path):
    """Same data path and settings, changed text: the step's batch digest refuses the cache."""
    from quietstar.data.corpora import load_texts

    texts = [t for t in load_texts("builtin:arithmetic", num_documents=200)]
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(texts), encoding="utf-8")
    settings = dict(data=str(data), teacher_cache=str(tmp_path / "cache"), cache_top_k=4, max_steps=1)
    distill(distill_config(teacher_dir, tmp_path / "a", **settings))
    data.write_text("\n\n".join(t.replace("e", "a") for t in texts), encoding="utf-8")
    with pytest.raises(QuietStarInputError, match="not the text the cache was made from"):
        distill(distill_config(teacher_dir, tmp_path / "b", **settings))


def cached_steps(folder) -> list[dict[str, torch.Tensor]]:
    """Every step's rows of a complete cache (digest, ids, logprobs, rest), whatever its shards."""
    index = json.loads((folder / teacher_cache.INDEX_NAME).read_text())
    steps = []
    for shard in index["shards"]:
        tensors = load_file(folder / shard["file"])
        for j in range(shard["steps"]):
            a, b = int(tensors["offsets"][j]), int(tensors["offsets"][j + 1])
            steps.append({"inputs": tensors["inputs"][j], "ids": tensors["ids"][a:b],
                          "logprobs": tensors["logprobs"][a:b], "rest": tensors["rest"][a:b]})
    return steps


def same_steps(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


# A constant learning rate: the cosine schedule depends on max_steps, so 2 then 4 steps would
# otherwise not be the 4-step run whatever the cache does.
GROW = dict(cache_top_k=6, lr_schedule="constant")


def test_a_resumed_run_with_more_steps_grows_the_cache_as_one_written_at_once(teacher_dir, tmp_path):
    grown, whole = tmp_path / "grown", tmp_path / "whole"
    distill(distill_config(teacher_dir, tmp_path / "split", max_steps=2, teacher_cache=str(grown), **GROW))
    assert json.loads((grown / teacher_cache.INDEX_NAME).read_text())["made_from"]["steps"] == 2
    old = cached_steps(grown)
    resumed = distill(distill_config(teacher_dir, tmp_path / "split", max_steps=4, teacher_cache=str(grown),
                                     resume="latest", **GROW))
    once = distill(distill_config(teacher_dir, tmp_path / "once", max_steps=4, teacher_cache=str(whole), **GROW))
    assert resumed.step == 4 and resumed.metrics == {**once.metrics, "step_time_s": resumed.metrics["step_time_s"]}
    a, b = exported_weights(tmp_path / "split"), exported_weights(tmp_path / "once")
    assert all(torch.equal(a[k], b[k]) for k in a)

    index = json.loads((grown / teacher_cache.INDEX_NAME).read_text())
    assert index["made_from"] == json.loads((whole / teacher_cache.INDEX_NAME).read_text())["made_from"]
    assert [(s["file"], s["first_step"], s["steps"]) for s in index["shards"]] == [
        ("shard-00000.safetensors", 0, 2), ("shard-00001.safetensors", 2, 2)]  # the old shard untouched
    assert same_steps(cached_steps(grown)[:2], old)
    assert same_steps(cached_steps(grown), cached_steps(whole))
    # A 4-step run from the start reads the grown cache (old and new part checked) as the fresh one.
    reread = distill(distill_config(teacher_dir, tmp_path / "reread", max_steps=4, teacher_cache=str(grown), **GROW))
    c = exported_weights(tmp_path / "reread")
    assert reread.metrics["loss"] == once.metrics["loss"] and all(torch.equal(b[k], c[k]) for k in b)


def test_an_interrupted_growth_leaves_the_old_cache_and_a_retry_completes_it(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "SHARD_BYTES", 1)  # one step per shard: growing 2 -> 4 writes two
    grown, whole = tmp_path / "grown", tmp_path / "whole"
    distill(distill_config(teacher_dir, tmp_path / "split", max_steps=2, teacher_cache=str(grown), **GROW))
    index_before, old = (grown / teacher_cache.INDEX_NAME).read_text(), cached_steps(grown)

    write_shard = teacher_cache.CacheWriter._write_shard

    def write_one_then_fail(writer):
        write_shard(writer)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(teacher_cache.CacheWriter, "_write_shard", write_one_then_fail)
    resume = distill_config(teacher_dir, tmp_path / "split", max_steps=4, teacher_cache=str(grown), resume="latest",
                            **GROW)
    with pytest.raises(RuntimeError, match="interrupted"):
        distill(resume)
    assert (grown / "shard-00002.safetensors").is_file()  # the new shard, listed nowhere
    assert (grown / teacher_cache.INDEX_NAME).read_text() == index_before
    assert same_steps(cached_steps(grown), old)
    # The old cache still serves its 2 steps: a 2-step run from it equals the first.
    distill(distill_config(teacher_dir, tmp_path / "again", max_steps=2, teacher_cache=str(grown), **GROW))
    a, b = exported_weights(tmp_path / "split"), exported_weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)

    monkeypatch.setattr(teacher_cache.CacheWriter, "_write_shard", write_shard)
    distill(resume)
    distill(distill_config(teacher_dir, tmp_path / "once", max_steps=4, teacher_cache=str(whole), **GROW))
    assert sorted(p.name for p in grown.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert same_steps(cached_steps(grown), cached_steps(whole))
    a, b = exported_weights(tmp_path / "split"), exported_weights(tmp_path / "once")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_for_fewer_steps_of_another_run_is_refused_not_grown(teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    distill(distill_config(teacher_dir, tmp_path / "a", max_steps=2, teacher_cache=str(cache), **GROW))
    files = {p.name: p.read_bytes() for p in cache.iterdir()}
    base = distill_config(teacher_dir, tmp_path / "b", max_steps=4, teacher_cache=str(cache), **GROW)
    other_teacher = tmp_path / "teacher2"
    thinking_teacher(seed=5).save_pretrained(other_teacher)
    for change, words in [({"temperature": 2.0}, "made with temperature 1.0, this run has 2.0; give another "
                                                 "--teacher-cache folder"),
                          ({"cache_top_k": 4}, "made with top_k 6, this run has 4"),
                          ({"batch_size": 1}, "made with batch_size 2, this run has 1"),
                          ({"teacher": str(other_teacher)}, "made with teacher_sha256 ")]:
        with pytest.raises(QuietStarInputError, match=words):
            distill(replace(base, **change))
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == files
