"""GSM8K and CommonsenseQA scores, with thoughts and without.

Three measurements, each taken with thoughts off (the base model: K = 0) and on (a thought of K
tokens after every token), each reported as a mean with a bootstrap 95% interval:

``direct``
    The paper's zero-shot score. The prompt ``"Q: {question}\\nA:"`` is followed by the gold answer
    and a newline, teacher-forced. Each answer token's probability is read from the model's
    softmax *restricted to the answer vocabulary* (digits and newline for GSM8K, with a minus sign
    and a decimal point for the answers that have them; the choice letters and newline for
    CommonsenseQA) and renormalised; an item scores the product over its answer tokens. It is an expected accuracy, smoother than argmax accuracy. With thoughts on, token
    x_{j} is predicted by the mixed prediction after a thought at position j-1.
``accuracy``
    Greedy answer after ``"Q: ...\\nA:"`` (up to the first newline), exact match.
``cot``
    Zero-shot chain of thought with majority vote (GSM8K): sample ``"Q: ...\\nA: Let's think step
    by step."``, append ``"\\nTherefore, the answer (arabic numerals) is"``, read the first integer
    of the greedy continuation, vote over the samples.

``quietstar eval --model DIR --task gsm8k --data test.jsonl --limit 128 --metrics direct,accuracy``
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from quietstar.evaluation.answers import first_integer, first_number, majority_vote, parse_choice, parse_gsm8k_gold
from quietstar.utils.batching import model_device, pad_sequences
from quietstar.utils.modes import eval_mode
from quietstar.data.corpora import read_jsonl
from quietstar.method.controls import shifted_thoughts
from quietstar.evaluation.statistics import format_cell, summarize
from quietstar.utils.errors import QuietStarInputError

TASKS = ("gsm8k", "csqa")
METRICS = ("direct", "accuracy", "cot")
HUB_SOURCES = {  # task -> (dataset, config, split) used when no local file is given
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "csqa": ("tau/commonsense_qa", None, "validation"),
}
COT_TRIGGER = " Let's think step by step."
COT_ANSWER_TRIGGER = "\nTherefore, the answer (arabic numerals) is"
ANSWER_MAX_TOKENS = 16     # a GSM8K number or a choice letter fits easily
COT_ANSWER_MAX_TOKENS = 16


# --------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Item:
    """One question. ``question`` is what follows "Q: " (CommonsenseQA: with its lettered choices);
    ``answer`` is the gold answer as the model should write it ("72", "B")."""

    id: str
    question: str
    answer: str
    labels: tuple[str, ...] = ()   # choice labels (CommonsenseQA); empty for GSM8K

    @property
    def prompt(self) -> str:
        return f"Q: {self.question}\nA:"


def gsm8k_item(record: dict, index: int) -> Item:
    """An Item from a record in GSM8K's format: {"question", "answer": "... #### 72"}."""
    try:
        question, answer = record["question"], record["answer"]
    except KeyError as e:
        raise QuietStarInputError(f"GSM8K record {index} has no {e.args[0]!r} field; expected "
                                  "{'question': ..., 'answer': '... #### <number>'}") from None
    return Item(str(record.get("id", index)), question.strip(), parse_gsm8k_gold(answer))


def csqa_item(record: dict, index: int) -> Item:
    """An Item from a record in CommonsenseQA's format:
    {"id", "question", "choices": {"label": [...], "text": [...]}, "answerKey"}."""
    try:
        labels, texts = record["choices"]["label"], record["choices"]["text"]
        question, key = record["question"], record["answerKey"]
    except (KeyError, TypeError) as e:
        raise QuietStarInputError(f"CommonsenseQA record {index} lacks {e}; expected {{'question', "
                                  "'choices': {'label': [...], 'text': [...]}, 'answerKey'}") from None
    if key not in labels:
        raise QuietStarInputError(f"CommonsenseQA record {index}: answerKey {key!r} is not one of {labels}")
    choices = " ".join(f"({label}) {text}" for label, text in zip(labels, texts))
    return Item(str(record.get("id", index)), f"{question.strip()}\n{choices}", key, tuple(labels))


def load_items(task: str, data: str | None = None, limit: int | None = None) -> list[Item]:
    """The task's items from a local JSONL file in the dataset's own format, or else from the
    Hugging Face Hub (GSM8K test, CommonsenseQA validation); the first ``limit`` only."""
    if task not in TASKS:
        raise QuietStarInputError(f"unknown task {task!r}; choose one of {TASKS}")
    if data is not None:
        path = Path(data).expanduser()
        if path.is_dir():
            raise QuietStarInputError(f"--data {path} is a folder; give a JSONL file in {HUB_SOURCES[task][0]}'s format")
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        records, lines = [], []
        for line_no, record in read_jsonl(path):
            lines.append(line_no)
            if not isinstance(record, dict):
                raise QuietStarInputError(f"{path}:{line_no} holds a JSON {type(record).__name__}, not a record "
                                          "(an object {...} per line)")
            records.append(record)
        if not records:
            raise QuietStarInputError(f"--data {path} holds no records; give a JSONL file in {HUB_SOURCES[task][0]}'s "
                                      "format, one record per line")
    else:
        import datasets

        name, config, split = HUB_SOURCES[task]
        try:
            records = datasets.load_dataset(name, config, split=split)
        except (ConnectionError, FileNotFoundError, ValueError) as e:
            raise QuietStarInputError(f"could not load {name} ({type(e).__name__}: {e}); without network "
                                      f"pass a local copy with --data FILE.jsonl in {name}'s format") from e
    if limit is not None:
        records = [records[i] for i in range(min(limit, len(records)))]
    make = gsm8k_item if task == "gsm8k" else csqa_item
    items = []
    for i, record in enumerate(records):
        try:
            items.append(make(record, i))
        except ValueError as e:
            raise QuietStarInputError(f"{path}:{lines[i]}: {e}" if data is not None else str(e)) from None
    return items


# --------------------------------------------------------------------------------------- model helpers
def _batches(items: Sequence, size: int, description: str, progress: bool):
    if size < 1:
        raise QuietStarInputError(f"batch_size must be >= 1, got {size}")
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        yield items[start:start + size]


THOUGHT_SOURCES = ("sampled", "random", "shifted")


def thoughts_for(model, input_ids, attention_mask, thought_tokens: int, source: str = "sampled",
                 thought_temperature: float | None = None,
                 generator: torch.Generator | None = None,
                 thought_positions: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, k] thoughts for every position (or those of ``thought_positions`` [B, L] bool, the
    only ones sampled: the others hold the pad id), from ``source``:

    * ``"sampled"``: the model's own (``sample_thoughts``), as it predicts;
    * ``"random"``: uniform random tokens of the vocabulary (never a meta token): thoughts with
      no content, through the same mixing head;
    * ``"shifted"``: the model's own thoughts, each moved to the thinking position half the
      document's thinking positions further on (cyclically; thinking everywhere in an unpadded
      row: L // 2 further on): fluent thoughts about another place in the text
      (``method.controls.shifted_thoughts``).

    The last two are controls: if the model gains as much from them as from its own thoughts, the
    gain does not come from what the thoughts say."""
    if source not in THOUGHT_SOURCES:
        raise QuietStarInputError(f"thought source must be one of {THOUGHT_SOURCES}, got {source!r}")
    if source == "random":
        vocab = model.lm.get_output_embeddings().weight.shape[0]
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[[i for i in (model.start_id, model.end_id) if i < vocab]] = False
        candidates = allowed.nonzero().squeeze(1)
        picks = torch.randint(0, candidates.numel(), (*input_ids.shape, thought_tokens), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        return candidates.to(picks.device)[picks].to(input_ids.device)
    if source == "shifted":
        return shifted_thoughts(model, input_ids, attention_mask, num_tokens=thought_tokens,
                                temperature=thought_temperature, generator=generator,
                                thought_positions=thought_positions)
    return model.sample_thoughts(input_ids, attention_mask, num_tokens=thought_tokens,
                                 temperature=thought_temperature, generator=generator,
                                 thought_positions=thought_positions)


@torch.no_grad()
def next_token_logits(model, input_ids, attention_mask, thought_tokens: int,
                      thought_temperature: float | None = None,
                      generator: torch.Generator | None = None,
                      thought_source: str = "sampled",
                      thought_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, predicted) logits [B, L, V]; position i predicts token i+1.

    ``base`` is the model without thoughts. ``predicted`` is what the model predicts: the base
    logits when ``thought_tokens`` is 0, else the mixed prediction after a ``thought_tokens``-token
    thought at position i (sampled at ``thought_temperature``, default the model's; 0 = greedy;
    ``thought_source`` picks a control instead, see ``thoughts_for``). With ``thought_positions``
    [B, L] bool only those positions think (the cost of the text pass plus theirs), the others
    predict with the base.
    """
    k, temperature = model.config.thought_settings(thought_tokens, thought_temperature)
    if k == 0:
        logits = model.base_logits(input_ids, attention_mask)
        return logits, logits
    if thought_source == "sampled":  # sampled and scored in one rollout: the text pass runs once
        _, scores = model.think(input_ids, attention_mask, k, temperature, generator, thought_positions, steps=1)
    else:
        thoughts = thoughts_for(model, input_ids, attention_mask, k, thought_source, temperature, generator,
                                thought_positions)
        scores = model.score_thoughts(input_ids, thoughts, attention_mask, thought_positions, steps=1)
    return scores.base_logits, scores.mixed_logits[:, :, 0]


# --------------------------------------------------------------------------------------- direct score
def number_signs(answer: str) -> str:
    """The signs a GSM8K gold ``answer`` writes besides digits: "-" (negative), "." (decimal)."""
    return ("-" if answer.startswith("-") else "") + ("." if "." in answer else "")


def _answer_piece_rule(task: str, labels: tuple[str, ...], signs: str):
    if task == "gsm8k":
        # digits, after a leading minus and around a decimal point where the answer has them
        number = re.compile(("-?" if "-" in signs else "") + "[0-9]*" + (r"\.?[0-9]*" if "." in signs else ""))
        return lambda piece: number.fullmatch(piece) is not None
    return lambda piece: piece in labels


@lru_cache(maxsize=16)
def _answer_vocabulary_cached(tokenizer, tokenizer_size: int, task: str, labels: tuple[str, ...], signs: str,
                              vocab_size: int) -> torch.Tensor:
    is_piece = _answer_piece_rule(task, labels, signs)
    special = set(tokenizer.all_special_ids)
    ids = range(min(tokenizer_size, vocab_size))
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    for i, text in zip(ids, texts):
        if i in special:
            continue
        piece = text[1:] if text.startswith(" ") else text
        allowed[i] = text == "\n" or (piece != "" and is_piece(piece))
    return allowed


def answer_vocabulary(tokenizer, task: str, labels: Sequence[str] = (), vocab_size: int | None = None,
                      answer: str = "") -> torch.Tensor:
    """[vocab_size] bool: the tokens the direct score may predict, found from the tokenizer.

    A token belongs if its text is a newline, or, after at most one leading space, is made of
    digits (GSM8K) or is exactly one choice label (CommonsenseQA). The optional space covers
    tokenizers that glue it to the first answer token (" 72", " B"); special tokens never belong.
    For a GSM8K gold ``answer`` that is negative or decimal ("-2", "2.5") the minus sign (leading)
    and the decimal point (between digits) belong too, for that item only: every integer answer
    keeps the paper's digits-and-newline vocabulary, so its score is unchanged.
    """
    if task not in TASKS:
        raise QuietStarInputError(f"unknown task {task!r}; choose one of {TASKS}")
    signs = number_signs(answer) if task == "gsm8k" else ""
    # Keyed on the tokenizer's size too: adding tokens (as from_base does) must not reuse a stale mask.
    return _answer_vocabulary_cached(tokenizer, len(tokenizer), task, tuple(labels), signs,
                                     vocab_size or len(tokenizer))


def answer_token_span(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + " " + answer + "\\n"`` and the index of the first answer token.

    The text is tokenized whole (as the model would read it) and the answer tokens are those ending
    after the answer's first character, so a separate space token stays in the prompt.
    """
    text = f"{prompt} {answer}\n"
    start = len(prompt) + 1
    encoding = tokenizer(text, return_offsets_mapping=True)
    ends = [end for _, end in encoding["offset_mapping"]]
    first = next(j for j, end in enumerate(ends) if end > start)
    if first == 0:
        raise QuietStarInputError(f"the prompt {prompt!r} encodes to no token before the answer")
    return encoding["input_ids"], first


@torch.no_grad()
def direct_scores(model, items: Sequence[Item], task: str, thought_tokens: int = 0,
                  thought_temperature: float | None = None, batch_size: int = 8,
                  generator: torch.Generator | None = None, progress: bool = False) -> np.ndarray:
    """The paper's direct score of every item: the product over the answer tokens (and the closing
    newline) of their probability under the softmax restricted to ``answer_vocabulary``.

    ``thought_tokens = 0`` scores the base model; K > 0 the mixed prediction after K-token thoughts,
    thought at the positions that predict the answer tokens only (no other position is scored).
    """
    tokenizer, device = model.tokenizer, model_device(model)
    scores = []
    unscorable = 0
    label = f"direct ({'thoughts off' if thought_tokens == 0 else f'{thought_tokens}-token thoughts'})"
    for batch in _batches(items, batch_size, label, progress):
        encoded = [answer_token_span(tokenizer, item.prompt, item.answer) for item in batch]
        ids, mask = pad_sequences([e[0] for e in encoded], tokenizer.pad_token_id, "right", device)
        scored = torch.zeros_like(mask, dtype=torch.bool)  # the positions that predict answer tokens
        for b, (tokens, first) in enumerate(encoded):
            scored[b, first - 1:len(tokens) - 1] = True
        _, logits = next_token_logits(model, ids, mask, thought_tokens, thought_temperature, generator,
                                      thought_positions=scored)
        for b, (item, (tokens, first)) in enumerate(zip(batch, encoded)):
            vocab = answer_vocabulary(tokenizer, task, item.labels, logits.shape[-1], item.answer).to(device)
            rows = logits[b, first - 1:len(tokens) - 1].float()     # predict tokens first..end
            targets = torch.tensor(tokens[first:], device=device)
            logp = rows.masked_fill(~vocab, float("-inf")).log_softmax(-1)
            unscorable += int((~vocab[targets]).any())
            scores.append(logp.gather(-1, targets[:, None]).sum().exp().item())
    if unscorable:
        warnings.warn(f"{unscorable} answer(s) contain tokens outside the {task} answer vocabulary "
                      "(digits with the answer's minus sign and decimal point / choice letters, and newline) "
                      "and score 0", stacklevel=2)
    return np.array(scores)


# --------------------------------------------------------------------------------------- generation metrics
def _generate_texts(model, prompts: Sequence[str], thought_tokens: int, max_new_tokens: int,
                    thought_temperature: float | None, generator: torch.Generator | None,
                    temperature: float = 0.0) -> list[str]:
    """Continuations of ``prompts`` (greedy when ``temperature`` is 0), thinking K tokens per step."""
    tokenizer = model.tokenizer
    ids, mask = pad_sequences([tokenizer(p).input_ids for p in prompts], tokenizer.pad_token_id, "left",
                              model_device(model))
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         thought_tokens=thought_tokens, thought_temperature=thought_temperature,
                         eos_token_id=tokenizer.eos_token_id, generator=generator, **sampling)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def parse_answer(task: str, item: Item, completion: str) -> str | None:
    """The answer in a greedy completion after "A:": its first line's first number / choice letter."""
    line = completion.strip().split("\n", 1)[0]
    return first_number(line) if task == "gsm8k" else parse_choice(line, item.labels)


@torch.no_grad()
def accuracy_predictions(model, items: Sequence[Item], task: str, thought_tokens: int = 0,
                         thought_temperature: float | None = None, batch_size: int = 8,
                         generator: torch.Generator | None = None,
                         progress: bool = False) -> list[str | None]:
    """The greedy answer of every item (None when none can be read)."""
    predictions = []
    label = f"accuracy ({'thoughts off' if thought_tokens == 0 else f'{thought_tokens}-token thoughts'})"
    for batch in _batches(items, batch_size, label, progress):
        texts = _generate_texts(model, [item.prompt for item in batch], thought_tokens,
                                ANSWER_MAX_TOKENS, thought_temperature, generator)
        predictions += [parse_answer(task, item, text) for item, text in zip(batch, texts)]
    return predictions


@torch.no_grad()
def cot_predictions(model, items: Sequence[Item], thought_tokens: int = 0, samples: int = 8,
                    temperature: float = 0.7, max_reasoning_tokens: int = 128,
                    thought_temperature: float | None = None, batch_size: int = 8,
                    generator: torch.Generator | None = None,
                    progress: bool = False) -> list[tuple[str | None, list[str | None]]]:
    """Zero-shot chain of thought with majority vote: (voted answer, the samples' answers) per item.

    Each of ``samples`` reasonings is sampled at ``temperature`` for up to ``max_reasoning_tokens``
    tokens (cut where the model starts a new "Q:"), then the answer is read greedily after the
    trigger ``COT_ANSWER_TRIGGER``.
    """
    if samples < 1:
        raise QuietStarInputError(f"cot samples must be >= 1, got {samples}")
    results = []
    label = f"cot ({'thoughts off' if thought_tokens == 0 else f'{thought_tokens}-token thoughts'})"
    for batch in _batches(items, max(1, batch_size // samples), label, progress):
        prompts = [f"{item.prompt}{COT_TRIGGER}" for item in batch for _ in range(samples)]
        reasonings = _generate_texts(model, prompts, thought_tokens, max_reasoning_tokens,
                                     thought_temperature, generator, temperature)
        reasonings = [r.split("\nQ:", 1)[0].rstrip() for r in reasonings]
        finals = _generate_texts(model, [p + r + COT_ANSWER_TRIGGER for p, r in zip(prompts, reasonings)],
                                 thought_tokens, COT_ANSWER_MAX_TOKENS, thought_temperature, generator)
        answers = [first_integer(f) for f in finals]
        for b in range(len(batch)):
            votes = answers[b * samples:(b + 1) * samples]
            results.append((majority_vote(votes), votes))
    return results


# --------------------------------------------------------------------------------------- evaluate
def evaluate(model, task: str, items: Sequence[Item], metrics: Sequence[str] = ("direct",),
             thought_tokens: int | None = None, thought_temperature: float | None = None,
             batch_size: int = 8, seed: int = 0, cot_samples: int = 8, cot_temperature: float = 0.7,
             cot_max_tokens: int = 128, progress: bool = True) -> dict:
    """Every metric with thoughts off and on (``thought_tokens``, default the model's k).

    Returns {"task", "n_items", "thought_tokens", "thought_temperature", "seed", "metrics":
    {metric: {"off", "on", "difference"}: summaries}, "items": per-item values}; the difference
    (on - off) is paired by item.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise QuietStarInputError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    if "cot" in metrics and task != "gsm8k":
        raise QuietStarInputError("the chain-of-thought metric reads an arabic-numeral answer: GSM8K only")
    if not items:
        raise QuietStarInputError("no items to evaluate")
    K, T = model.config.thought_settings(thought_tokens, thought_temperature)
    if K < 1:
        raise QuietStarInputError(f"thought_tokens must be >= 1 (thoughts off is always measured too), got {K}")
    per_item = [{"id": item.id, "answer": item.answer} for item in items]
    results = {}
    with eval_mode(model):
        for metric in metrics:
            values = {}
            for mode, k in (("off", 0), ("on", K)):
                # The same thoughts and samples for every run with this seed.
                generator = torch.Generator(model_device(model)).manual_seed(seed)
                if metric == "direct":
                    scores = direct_scores(model, items, task, k, T, batch_size, generator, progress)
                    for row, s in zip(per_item, scores):
                        row[f"direct_{mode}"] = float(s)
                elif metric == "accuracy":
                    predictions = accuracy_predictions(model, items, task, k, T, batch_size, generator,
                                                       progress)
                    scores = np.array([p == item.answer for p, item in zip(predictions, items)], float)
                    for row, p in zip(per_item, predictions):
                        row[f"accuracy_{mode}"] = p
                else:
                    voted = cot_predictions(model, items, k, cot_samples, cot_temperature,
                                            cot_max_tokens, T, batch_size, generator, progress)
                    scores = np.array([v == item.answer for (v, _), item in zip(voted, items)], float)
                    for row, (v, votes) in zip(per_item, voted):
                        row[f"cot_{mode}"] = {"answer": v, "votes": votes}
                values[mode] = scores
            results[metric] = {"off": summarize(values["off"], seed=seed),
                               "on": summarize(values["on"], seed=seed),
                               "difference": summarize(values["on"] - values["off"], seed=seed)}
    return {"task": task, "n_items": len(items), "thought_tokens": K, "thought_temperature": T,
            "seed": seed, "metrics": results, "items": per_item}


def format_table(results: dict) -> str:
    """A one-screen table of ``evaluate``'s results."""
    lines = [f"{results['task']}: {results['n_items']} items, thoughts of {results['thought_tokens']} "
             f"tokens at temperature {results['thought_temperature']:g}; mean [95% bootstrap CI]",
             f"{'metric':<10}{'thoughts off':<26}{'thoughts on':<26}{'on - off':<26}"]
    for metric, r in results["metrics"].items():
        lines.append(f"{metric:<10}{format_cell(r['off']):<26}{format_cell(r['on']):<26}"
                     f"{format_cell(r['difference'], True):<26}")
    return "\n".join(lines)
