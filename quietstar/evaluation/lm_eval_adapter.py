"""Any lm-evaluation-harness task, with thoughts.

``QuietStarLM`` is lm-eval's ``HFLM`` with its two model calls replaced: log-likelihoods come from
the mixed prediction after a thought at each position lm-eval scores (``model.score_thoughts``;
the context's other positions do not think), generation from thinking generation
(``model.generate``). With ``thought_tokens=0`` it is the base model. All of
``HFLM``'s batching, tokenization and request handling is kept.

lm-eval must be installed (``pip install 'quietstar[eval]'``). Tasks run offline when their data
is local, e.g. a task YAML with ``dataset_path: json`` in a folder given as ``include_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

try:
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("quietstar's lm-eval support needs lm-evaluation-harness: "
                                 "pip install 'lm-eval>=0.4.5' (or pip install 'quietstar[eval]')") from e

from quietstar.evaluation.tasks import next_token_logits
from quietstar.evaluation.statistics import format_cell, summarize
from quietstar.utils.errors import MissingDependencyError, QuietStarInputError


class QuietStarLM(HFLM):
    """lm-eval model: a QuietStarForCausalLM thinking ``thought_tokens`` tokens (0 = off).

    Thoughts are sampled at ``thought_temperature`` (default the model's; 0 = greedy) from a
    generator seeded with ``seed``, so a run is reproducible.
    """

    def __init__(self, model, thought_tokens: int = 0, thought_temperature: float | None = None,
                 batch_size: int = 8, seed: int = 0, max_length: int | None = None):
        super().__init__(pretrained=model.lm, tokenizer=model.tokenizer, batch_size=batch_size,
                         max_length=max_length)
        self.quietstar = model.eval()
        self.thought_tokens, self.thought_temperature = model.config.thought_settings(
            thought_tokens, thought_temperature)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._scored: dict[tuple[int, ...], int] = {}  # model input -> positions lm-eval reads

    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        """HFLM's, remembering for every model input how many of its last positions lm-eval reads
        (the continuation's), so that ``_model_call`` thinks there only."""
        for _, context, continuation in requests:
            inp = tuple((context + continuation)[-(self.max_length + 1):][:-1])  # as HFLM builds it
            self._scored[inp] = max(self._scored.get(inp, 0), len(continuation))
        try:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        finally:
            self._scored = {}

    def _scored_positions(self, inps: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the positions of right-padded ``inps`` that lm-eval reads. A row whose
        input is not known for certain (HFLM pads with token 0, which may also end an input) thinks
        at every position: slower, the same numbers."""
        scored = torch.zeros_like(inps, dtype=torch.bool)
        for b, row in enumerate(inps.tolist()):
            last = max((i for i, t in enumerate(row) if t != 0), default=0) + 1
            matches = [n for n in range(last, len(row) + 1) if tuple(row[:n]) in self._scored]
            if len(matches) == 1:
                n = matches[0]
                scored[b, n - self._scored[tuple(row[:n])]:n] = True
            else:
                scored[b] = True
        return scored

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Next-token logits [B, L, V] of right-padded ``inps`` (any length >= 1). A thought at
        position i sees only tokens 0..i, so the padding after a sequence changes none of its
        logits; within a log-likelihood request only the positions lm-eval reads think."""
        positions = self._scored_positions(inps) if self._scored and self.thought_tokens else None
        _, logits = next_token_logits(self.quietstar, inps, torch.ones_like(inps), self.thought_tokens,
                                      self.thought_temperature, self.generator, thought_positions=positions)
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs) -> torch.Tensor:
        """Thinking generation; lm-eval cuts each continuation at its stop strings afterwards."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        temperature = float(generation_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(generation_kwargs.pop("do_sample", temperature > 0)) and temperature > 0
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        for name in ("top_k", "top_p"):
            if generation_kwargs.get(name) is not None and do_sample:
                sampling[name] = generation_kwargs[name]
        with torch.no_grad():
            return self.quietstar.generate(
                context, attention_mask=attention_mask, max_new_tokens=max_length - context.shape[1],
                eos_token_id=self.tokenizer.eos_token_id, thought_tokens=self.thought_tokens,
                thought_temperature=self.thought_temperature, **sampling)


def _per_document(samples: list[dict]) -> dict[str, np.ndarray]:
    """{"metric,filter": values ordered by doc_id} for metrics with a number per document."""
    rows = sorted(samples, key=lambda s: s["doc_id"])
    values = {}
    for name in rows[0]["metrics"] if rows else []:
        column = [s.get(name) for s in rows]
        if all(isinstance(v, (int, float, np.number, bool)) for v in column):
            values[f"{name},{rows[0]['filter']}"] = np.asarray(column, dtype=np.float64)
    return values


def evaluate_lm_eval(model, tasks: Sequence[str], thought_tokens: int | None = None,
                     thought_temperature: float | None = None, limit: int | None = None,
                     batch_size: int = 8, include_path: str | None = None, seed: int = 0) -> dict:
    """lm-eval ``tasks`` with thoughts off and on (``thought_tokens``, default the model's k).

    Returns {"tasks", "thought_tokens", "thought_temperature", "seed", "metrics": {"task/metric":
    {"off", "on", "difference"}}, "lm_eval": {"off", "on": lm-eval's own results}}, with the same
    per-document bootstrap summaries as ``quietstar.evaluation.tasks.evaluate``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    K, T = model.config.thought_settings(thought_tokens, thought_temperature)
    manager = TaskManager(include_path=include_path)
    known = set(manager.match_tasks(list(tasks)))
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    if unknown:
        raise QuietStarInputError(f"--lm-eval: unknown lm-eval task(s) {', '.join(unknown)}; `lm-eval ls tasks` "
                                  "lists them (local task YAMLs: --lm-eval-include DIR)")
    raw, per_doc = {}, {}
    for mode, k in (("off", 0), ("on", K)):
        lm = QuietStarLM(model, k, T, batch_size=batch_size, seed=seed)
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              log_samples=True, bootstrap_iters=0, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        raw[mode] = out["results"]
        per_doc[mode] = {f"{task}/{metric}": v for task, samples in out["samples"].items()
                         for metric, v in _per_document(samples).items()}
    metrics = {}
    for name, off in per_doc["off"].items():
        on = per_doc["on"][name]
        metrics[name] = {"off": summarize(off, seed=seed), "on": summarize(on, seed=seed),
                         "difference": summarize(on - off, seed=seed)}
    return {"tasks": list(tasks), "thought_tokens": K, "thought_temperature": T, "seed": seed,
            "metrics": metrics, "lm_eval": _plain(raw)}


def _plain(value):
    """lm-eval results with numpy scalars turned into JSON-ready Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def format_lm_eval_table(results: dict) -> str:
    """A one-screen table of ``evaluate_lm_eval``'s results."""
    width = max([len(name) for name in results["metrics"]] + [6]) + 2
    lines = [f"lm-eval {','.join(results['tasks'])}: thoughts of {results['thought_tokens']} tokens at "
             f"temperature {results['thought_temperature']:g}; mean [95% bootstrap CI]",
             f"{'metric':<{width}}{'n':>6}  {'thoughts off':<26}{'thoughts on':<26}{'on - off':<26}"]
    for name, r in results["metrics"].items():
        lines.append(f"{name:<{width}}{r['off']['n']:>6}  {format_cell(r['off']):<26}"
                     f"{format_cell(r['on']):<26}{format_cell(r['difference'], True):<26}")
    return "\n".join(lines)
