"""RLP and RPT for TRL's ``GRPOTrainer``: quietstar's positions, rewards and preset in TRL's engine.

``pip install quietstar[trl]``. A GRPO user switches to RLP (or RPT: ``objective="rpt"``) with
quietstar's definitions and keeps their own engine (vLLM, many GPUs):

    from trl import GRPOTrainer
    from quietstar import QuietStarConfig, load_base_model
    from quietstar.data.corpora import load_texts
    from quietstar.training import trl_grpo

    config = QuietStarConfig(objective="rlp", thoughts_per_position=8, sampled_thought_tokens=64,
                             ahead_tokens=1, thought_temperature=0.7)
    lm, tok = load_base_model("embedded:smollm2-135m-instruct")
    policy = trl_grpo.prepare_policy(lm, tok, config)           # START/END as tokens of the LM
    data = trl_grpo.position_dataset(load_texts("builtin:arithmetic"), tok, config, seq_len=512,
                                     positions_per_document=8, selection="random")  # {"train", "heldout"}
    reward = trl_grpo.ThoughtReward(tok, config)                # RLP's information gain
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, train_dataset=data["train"],
                          args=trl_grpo.grpo_config(config, output_dir="runs/trl-rlp"),
                          processing_class=tok, callbacks=[reward.callback])
    trainer.train()

One row of the dataset is one thinking position i of a document: the prompt is x_0..x_i
followed by START (as text; its tokens are checked to be exactly those ids), TRL's completion
is the thought c (at most k = ``sampled_thought_tokens`` tokens, sampled by the policy at
``thought_temperature``), and the reward reads

    rlp   r(c) = sum_{s<h} [log p_theta(x_{i+1+s} | x_<=i, START, c, END, x_{i+1..i+s})
                            - log p_EMA(x_{i+1+s} | x_<=i+s)]       ``objectives.information_gain``
    rpt   r(c) = 1 if argmax p_theta(. | x_<=i, START, c, END) is an exact prefix of
                 x_{i+1..i+h} ending on a token boundary, else 0    ``objectives.prefix_match``

from the policy itself (no gradient) by one plain forward of each row, and the EMA copy
(``ema_decay``) by one of each prefix: the same definitions as the native objectives
(``quietstar.method.objectives``), whose parallel rollout computes the same numbers for every
position at once. TRL's reward signature does not pass the model: ``ThoughtReward.callback``
(a ``TrainerCallback``) hands it the trainer's model at ``on_train_begin``, moves the EMA copy
after every optimiser step (``on_step_end``) and saves it into every Trainer checkpoint
(``quietstar_ema.safetensors``; ``on_save``), from which a resumed run reads it back.

``grpo_config`` sets what TRL can express of the native objective: G = ``num_generations``,
no KL (``beta=0``), rewards not scaled by their std and weighted G/(G-1) for rlp (so TRL's
group-mean advantage r - mean r becomes RLP's leave-one-out G/(G-1) (r - mean r)), PPO's
clipped surrogate per thought token averaged per thought and over the thoughts
(``loss_type="grpo"``, ``epsilon`` / ``epsilon_high`` from ``clip_eps_low`` / ``clip_eps_high``),
one update per batch of thoughts (``num_iterations=1``), the loss on the completion (thought)
tokens only. What TRL cannot express, one sentence each:

- START/END are ordinary embedding rows of the TRL policy, trained at the base learning rate:
  ``meta_token_lr_multiplier`` has no counterpart (it needs its own parameter group).
- A thought ends at EOS in TRL (and holds at most k tokens); the native thought holds exactly
  k tokens unless ``thought_can_end``.
- Which positions think is fixed when the dataset is built (``thought_selection`` "entropy":
  under the model given then); the native step chooses them anew from the current model.
- ``next_token_loss_weight`` > 0 (the LM's own NLL beside the surrogate) has no term in TRL's
  loss: ``grpo_config`` refuses it.
- With ``use_vllm=True`` vLLM samples from its own copy of the weights, where nothing keeps the
  meta tokens out of the thought (``prepare_policy``'s mask is a buffer of the transformers
  model, not saved): the training loss still gives them no probability.
- The cost: TRL generates and scores each (prefix, thought) as its own sequence, so every
  thought re-reads its prefix; the native rollout reads the text once for all positions
  (benchmarks/README.md, ``benchmarks/trl_rlp.py``).

The EMA copy is a full copy of the policy on each process (DDP); FSDP / ZeRO-3 sharding of the
copy is not supported here.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Sequence

import torch
from transformers import TrainerCallback

from quietstar.data.corpora import heldout_split, load_texts
from quietstar.method.config import QuietStarConfig
from quietstar.method.meta_tokens import add_meta_tokens, meta_token_init_vector
from quietstar.method.objectives import information_gain, prefix_match, update_ema
from quietstar.method.selection import select_positions
from quietstar.method.vocab import VocabHead
from quietstar.utils.batching import model_device, pad_sequences
from quietstar.utils.errors import MissingDependencyError, QuietStarInputError
from quietstar.utils.modes import eval_mode

EMA_FILE = "quietstar_ema.safetensors"  # the EMA copy inside a Trainer checkpoint folder
_INSTALL = "pip install quietstar[trl]"


def require_trl():
    """The ``trl`` module, or ``MissingDependencyError`` naming the extra that installs it."""
    try:
        import trl
    except ImportError as error:
        raise MissingDependencyError(f"RLP / RPT with TRL's GRPOTrainer needs trl: {_INSTALL}") from error
    return trl


def _check_objective(config: QuietStarConfig) -> None:
    if not isinstance(config, QuietStarConfig) or config.objective not in ("rlp", "rpt"):
        got = config.objective if isinstance(config, QuietStarConfig) else type(config).__name__
        raise QuietStarInputError(f"the TRL rewards train objective 'rlp' or 'rpt', got {got!r}: pass "
                                  "QuietStarConfig(objective='rlp') (or 'rpt')")


def _meta_ids(tokenizer, config: QuietStarConfig) -> tuple[int, int]:
    """START / END ids of a tokenizer that ``prepare_policy`` gave them."""
    vocab = tokenizer.get_vocab()
    tokens = (config.start_thought_token, config.end_thought_token)
    if not all(token in vocab for token in tokens):
        raise QuietStarInputError(f"the tokenizer has no {tokens[0]!r} / {tokens[1]!r} tokens: call "
                                  "trl_grpo.prepare_policy(lm, tokenizer, config) first, with this tokenizer")
    return vocab[tokens[0]], vocab[tokens[1]]


def _mask_value(dtype: torch.dtype) -> float:
    # Finite, so that TRL's entropy (p log p) stays 0 at p = 0, and still finite after / temperature.
    return -min(1e9, torch.finfo(dtype).max / 1e3)


def _mask_meta_rows(head: torch.nn.Module, ids: list[int]) -> None:
    """The LM head's logits of ``ids`` at a huge negative value in every forward, TRL's fused
    log-probabilities included (they read ``head.weight`` and ``head.bias``): through a bias that
    is 0 elsewhere, a non-persistent buffer (the saved model stays the plain LM) unless the head
    has a bias of its own."""
    bias = head.bias
    value = _mask_value(head.weight.dtype)
    if isinstance(bias, torch.nn.Parameter):
        with torch.no_grad():
            bias[ids] = value
        return
    mask = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
    mask[ids] = value
    del head.bias
    head.register_buffer("bias", mask, persistent=False)


def prepare_policy(lm, tokenizer, config: QuietStarConfig):
    """Makes the transformers causal LM ``lm`` a policy GRPOTrainer can sample thoughts from:
    adds START/END to ``tokenizer`` (``meta_tokens.add_meta_tokens``), grows the embeddings to
    hold them where needed, starts their input rows where quietstar starts its meta vectors
    (``meta_token_init``; rows a saved policy already has are kept), and masks their logits in
    every forward (``_mask_meta_rows``: the thought never contains them, and their probability
    is 0 in TRL's loss, as in ``VocabHead``). Returns ``lm``, changed in place: save it as usual,
    and after loading it again call this once more (the mask is not saved).

    A softcapped LM head (Gemma-2) is refused: the cap would bound the masked logits."""
    _check_objective(config)
    if getattr(lm.config.get_text_config(), "final_logit_softcapping", None):
        raise QuietStarInputError(f"{type(lm).__name__} softcaps its logits, which would let the meta tokens into "
                                  "TRL's thoughts; train it with quietstar train --config rlp instead")
    vocab = tokenizer.get_vocab()
    had = config.start_thought_token in vocab and config.end_thought_token in vocab
    start, end = add_meta_tokens(tokenizer, config.start_thought_token, config.end_thought_token)
    rows = lm.get_input_embeddings().weight.shape[0]
    if max(start, end) >= rows:
        lm.resize_token_embeddings(max(start, end) + 1, mean_resizing=False)
    embedding = lm.get_input_embeddings()
    if not had:
        init = meta_token_init_vector(tokenizer, embedding, config.meta_token_init)
        with torch.no_grad():
            embedding.weight[[start, end]] = init.to(embedding.weight.dtype)
    head = lm.get_output_embeddings()
    _mask_meta_rows(head, [i for i in (start, end) if i < head.weight.shape[0]])
    lm.quietstar_policy = True  # what the trainer's callback checks
    return lm


def policy_head(lm, tokenizer, config: QuietStarConfig) -> VocabHead:
    """The LM head of a policy (or its EMA copy) as the rewards read it: the meta tokens never
    predicted, ``loss_chunk_tokens`` rows at a time, softcapped where the LM is."""
    out = lm.get_output_embeddings()
    rows = out.weight.shape[0]
    ids = torch.tensor([i for i in _meta_ids(tokenizer, config) if i < rows], dtype=torch.long,
                       device=out.weight.device)
    cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    return VocabHead(out.weight, getattr(out, "bias", None), cap, ids, config.loss_chunk_tokens)


# ---------------------------------------------------------------------------------------------
# The dataset: one row per thinking position
# ---------------------------------------------------------------------------------------------


def _documents(texts) -> Iterable[str]:
    """Documents from a corpus name (``load_texts``), a ``datasets.Dataset`` with a "text"
    column, or an iterable of strings."""
    if isinstance(texts, str):
        return load_texts(texts)
    names = getattr(texts, "column_names", None)
    if names is not None:
        if "text" not in names:
            raise QuietStarInputError(f"the dataset has no 'text' column (its columns: {names}); rename the column "
                                      "that holds the documents to 'text'")
        return texts["text"]
    return texts


def _position_rows(ids: list[int], tokenizer, start: int, start_token: str, h: int, count: int, how: str,
                   entropy: torch.Tensor | None, generator: torch.Generator) -> list[dict[str, Any]]:
    """The rows of one tokenized document: ``count`` positions chosen by ``selection.select_positions``
    among those with a next token whose prompt text tokenizes back to exactly x_0..x_i START."""
    L = len(ids)
    prompts = [tokenizer.decode(ids[:i + 1], skip_special_tokens=True) + start_token for i in range(L - 1)]
    encoded = tokenizer(prompts).input_ids if prompts else []
    exact = [enc == ids[:i + 1] + [start] for i, enc in enumerate(encoded)]
    candidates = torch.tensor(exact + [False], dtype=torch.bool)[None]                  # [1, L]
    chosen = select_positions(candidates, 1.0, how, None if entropy is None else entropy[None], generator,
                              count=count)[0]
    return [{"prompt": prompts[i], "prefix_ids": ids[:i + 1], "target_ids": ids[i + 1:i + 1 + h], "position": i}
            for i in chosen.nonzero().flatten().tolist()]


@torch.no_grad()
def _entropy(model, head: VocabHead, ids: list[int]) -> torch.Tensor:
    """[L] the base prediction's entropy at every position of one document."""
    device = model_device(model)
    with eval_mode(model):
        hidden = model.get_decoder()(input_ids=torch.tensor([ids], device=device)).last_hidden_state[0]
    return head.entropy(hidden).cpu()


def position_dataset(texts, tokenizer, config: QuietStarConfig, *, seq_len: int, positions_per_document: int,
                     selection: str | None = None, model=None, seed: int = 0, num_heldout: int | None = None):
    """A ``datasets.DatasetDict`` {"train", "heldout"} for GRPOTrainer, one row per thinking
    position: "prompt" (the text x_0..x_i then START), "prefix_ids" (x_0..x_i), "target_ids"
    (x_{i+1}..x_{i+h}, fewer at the end), "document", "position" (i).

    ``texts``: a corpus name (``load_texts``: "builtin:arithmetic", a file, a Hub dataset), a
    ``datasets.Dataset`` with a "text" column, or strings. The held-out documents are those
    ``quietstar train`` holds out (``corpora.heldout_split``, ``num_heldout`` as
    ``--eval-documents``). Each document is tokenized as training does (its first ``seq_len``
    tokens) and ``positions_per_document`` positions think, chosen by ``selection`` (default
    ``config.thought_selection``): "random" (``seed``) or "entropy" (the highest entropy of the
    next-token prediction under ``model``, a ``prepare_policy`` LM). Positions whose prompt
    text would not tokenize back to exactly its ids (a cut inside a merged token) are skipped,
    so the policy samples after the very prefix the reward reads."""
    import datasets

    _check_objective(config)
    start = _meta_ids(tokenizer, config)[0]
    how = config.thought_selection if selection is None else selection
    if how == "entropy" and model is None:
        raise QuietStarInputError("selection='entropy' chooses positions by the model's next-token entropy: pass "
                                  "model=policy (or selection='random')")
    if seq_len < 2 or positions_per_document < 1:
        raise QuietStarInputError(f"seq_len must be >= 2 and positions_per_document >= 1, got {seq_len} and "
                                  f"{positions_per_document}")
    heldout, train = heldout_split(list(_documents(texts)), num_heldout)
    head = None if how != "entropy" else policy_head(model, tokenizer, config)
    generator = torch.Generator().manual_seed(seed)
    meta = set(_meta_ids(tokenizer, config))
    splits = {}
    for name, part in (("train", train), ("heldout", heldout)):
        rows: list[dict[str, Any]] = []
        for d, text in enumerate(part):
            if not isinstance(text, str):
                raise QuietStarInputError(f"document {d} is a {type(text).__name__}, not text: pass strings, or a "
                                          "dataset with a 'text' column")
            ids = tokenizer(text).input_ids[:seq_len]
            if meta & set(ids):
                raise QuietStarInputError(f"document {d} contains the thought meta tokens; the text must not: "
                                          "thoughts are inserted by the model")
            if len(ids) < 2:
                continue
            entropy = None if head is None else _entropy(model, head, ids)
            for row in _position_rows(ids, tokenizer, start, config.start_thought_token, config.ahead_tokens,
                                      positions_per_document, how, entropy, generator):
                rows.append({**row, "document": d})
        splits[name] = rows
    if not splits["train"]:
        raise QuietStarInputError("the texts give no thinking position to train on: no training document has two "
                                  "tokens or more (check that the data holds text, and that not all of it is "
                                  "held out: num_heldout)")
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) if rows else
                                 datasets.Dataset.from_dict({key: [] for key in ("prompt", "prefix_ids", "target_ids",
                                                                                   "position", "document")})
                                 for name, rows in splits.items()})


# ---------------------------------------------------------------------------------------------
# The rewards and their callback
# ---------------------------------------------------------------------------------------------


class ThoughtReward:
    """A GRPOTrainer reward function with ``config.objective``'s reward (rlp: information gain
    against the EMA copy; rpt: prefix match), for rows of ``position_dataset``. TRL calls it with
    ``prompts, completions, completion_ids`` and the dataset's columns; the model is not among
    them, so pass ``callbacks=[reward.callback]`` to the trainer, which binds its model (or call
    ``bind`` yourself). Returns one float per completion; ``rewards`` gives the tensor."""

    def __init__(self, tokenizer, config: QuietStarConfig):
        _check_objective(config)
        self.tokenizer, self.config = tokenizer, config
        self.start_id, self.end_id = _meta_ids(tokenizer, config)
        self.policy = None
        self.ema = None  # rlp: the EMA copy of the policy
        self.callback = ThoughtRewardCallback(self)
        self.__name__ = f"{config.objective}_reward"  # TRL logs each reward by its function's name

    def bind(self, policy, ema=None) -> None:
        """Reads thoughts with ``policy`` (the trainer's model) from now on; rlp: ``ema`` is the EMA
        copy (None: a frozen copy of the policy as it is now, unless one is bound already)."""
        self.policy = policy
        if self.config.objective == "rlp" and (ema is not None or self.ema is None):
            self.ema = ema if ema is not None else copy.deepcopy(policy).requires_grad_(False).eval()

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        missing = [name for name in ("prefix_ids", "target_ids") if name not in columns]
        if missing:
            raise QuietStarInputError(f"the dataset has no {missing} columns: build it with "
                                      "trl_grpo.position_dataset(texts, tokenizer, config, ...)")
        self.check_prompts(prompts, columns["prefix_ids"])
        return self.rewards(completion_ids, columns["prefix_ids"], columns["target_ids"]).tolist()

    def check_prompts(self, prompts: Sequence[str], prefix_ids: Sequence[Sequence[int]]) -> None:
        """Refuses prompts that the reward's tokenizer does not tokenize to their prefix then START
        (the dataset was built with another tokenizer, or its prompts were changed)."""
        for prompt, prefix, ids in zip(prompts, prefix_ids, self.tokenizer(list(prompts)).input_ids):
            if ids != list(prefix) + [self.start_id]:
                raise QuietStarInputError(
                    f"tokenizer mismatch: the prompt {prompt[-40:]!r} tokenizes to other ids than its prefix_ids "
                    "then START; build the dataset and the reward with the trainer's tokenizer (prepare_policy's)")

    @torch.no_grad()
    def rewards(self, completion_ids: Sequence[Sequence[int]], prefix_ids: Sequence[Sequence[int]],
                target_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N] float32: the reward of each thought ``completion_ids`` at its prefix x_0..x_i
        (``prefix_ids``) with the true continuation x_{i+1..} (``target_ids``, h or fewer)."""
        if self.policy is None:
            raise QuietStarInputError("the reward has no model: pass callbacks=[reward.callback] to GRPOTrainer "
                                      "(or call reward.bind(model))")
        cfg, h = self.config, self.config.ahead_tokens
        device = model_device(self.policy)
        targets = torch.zeros(len(target_ids), h, dtype=torch.long)
        valid = torch.zeros(len(target_ids), h, dtype=torch.bool)
        for r, t in enumerate(target_ids):
            targets[r, :len(t)], valid[r, :len(t)] = torch.tensor(t[:h], dtype=torch.long), True
        targets, valid = targets.to(device), valid.to(device)
        # x_<=i START c END x_{i+1..i+h-1}: END's state predicts x_{i+1}, the s-th after it x_{i+1+s}
        rows = [list(p) + [self.start_id] + list(c) + [self.end_id] + list(t[:h - 1])
                for p, c, t in zip(prefix_ids, completion_ids, target_ids)]
        first = [len(p) + len(c) + 1 for p, c in zip(prefix_ids, completion_ids)]
        head = policy_head(self.policy, self.tokenizer, cfg)
        hidden = self._hidden(self.policy, rows, first, h)                                    # [N, h, d]
        if cfg.objective == "rpt":
            predicted = head.sample(hidden[:, 0], 0.0)[0]                                     # [N] greedy
            hits = prefix_match(predicted, targets, valid, self.tokenizer.convert_ids_to_tokens)
            return hits.float().cpu()
        after = head.logprobs(hidden, targets)                                                # [N, h]
        # The EMA copy without a thought, once per distinct prefix: x_<=i+s predicts x_{i+1+s}.
        keys = [(tuple(p), tuple(t[:h])) for p, t in zip(prefix_ids, target_ids)]
        unique = list(dict.fromkeys(keys))
        ema_hidden = self._hidden(self.ema, [list(p) + list(t[:h - 1]) for p, t in unique],
                                  [len(p) - 1 for p, _ in unique], h)
        where = torch.tensor([unique.index(key) for key in keys], device=device)
        ema = policy_head(self.ema, self.tokenizer, cfg).logprobs(ema_hidden[where], targets)  # [N, h]
        return information_gain(after, ema, valid.to(after.dtype)).float().cpu()

    @staticmethod
    def _hidden(lm, rows: list[list[int]], first: list[int], h: int) -> torch.Tensor:
        """[N, h, d] final hidden states of ``lm`` on ``rows`` (right-padded, one forward without
        dropout) at positions first[n] .. first[n] + h - 1 (clamped to the row: past its end the
        states are not read)."""
        device = model_device(lm)
        ids, mask = pad_sequences(rows, 0, "right", device)
        with eval_mode(lm):
            hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state   # [N, T, d]
        last = mask.sum(1, keepdim=True) - 1                                                  # [N, 1]
        at = (torch.tensor(first, device=device)[:, None] + torch.arange(h, device=device)).minimum(last)
        return hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))


class ThoughtRewardCallback(TrainerCallback):
    """Binds the trainer's model to a ``ThoughtReward`` and keeps RLP's EMA copy: made at the
    start of training (or read back from the resumed checkpoint), moved after every optimiser
    step, saved into every checkpoint. Checks first what would spoil the group baseline or the
    prompts: a group of one thought, another tokenizer than the reward's."""

    def __init__(self, reward: ThoughtReward):
        self.reward = reward

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        group = getattr(args, "num_generations", None)
        if group is not None and group < 2:
            raise QuietStarInputError(f"num_generations is {group}: the group baseline needs at least 2 thoughts per "
                                      "position (trl_grpo.grpo_config sets thoughts_per_position)")
        reward = self.reward
        if processing_class is not None and processing_class.get_vocab() != reward.tokenizer.get_vocab():
            raise QuietStarInputError("tokenizer mismatch: the trainer's processing_class is not the tokenizer of the "
                                      "reward (pass the tokenizer that prepare_policy was given to both)")
        if not getattr(model, "quietstar_policy", False):
            raise QuietStarInputError("the trainer's model was not prepared: policy = trl_grpo.prepare_policy(lm, "
                                      "tokenizer, config) before GRPOTrainer(model=policy, ...)")
        reward.bind(model)
        if reward.config.objective == "rlp" and state.global_step > 0:
            self._load_ema(args, state)

    def _load_ema(self, args, state) -> None:
        from safetensors.torch import load_model

        resumed = getattr(args, "resume_from_checkpoint", None)
        folder = resumed if isinstance(resumed, str) else os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, EMA_FILE)
        if not os.path.isfile(path):
            raise QuietStarInputError(f"resuming at step {state.global_step} without RLP's EMA copy: {path} does not "
                                      "exist (checkpoints of a run with callbacks=[reward.callback] hold it)")
        self.reward.ema = copy.deepcopy(self.reward.policy).requires_grad_(False).eval()
        load_model(self.reward.ema, path, device=str(model_device(self.reward.ema)))

    def on_step_end(self, args, state, control, **kwargs):
        reward = self.reward
        if reward.config.objective == "rlp":
            update_ema(reward.ema, reward.policy, reward.config.ema_decay)

    def on_save(self, args, state, control, **kwargs):
        if self.reward.config.objective == "rlp" and state.is_world_process_zero:
            from safetensors.torch import save_model

            save_model(self.reward.ema, os.path.join(args.output_dir, f"checkpoint-{state.global_step}", EMA_FILE))


# ---------------------------------------------------------------------------------------------
# The preset
# ---------------------------------------------------------------------------------------------


def grpo_config(config: QuietStarConfig, **settings):
    """A ``trl.GRPOConfig`` with the native objective's settings where TRL can express them (the
    module docstring lists them and what it cannot); ``settings`` override any of them and add
    any other GRPOConfig field (``output_dir``, ``use_vllm``, ``per_device_train_batch_size``:
    a multiple of G, default G, ...). The learning rate and schedule are the RLP paper's (1e-6,
    constant), as ``--config rlp``."""
    trl = require_trl()
    _check_objective(config)
    if config.next_token_loss_weight > 0:
        raise QuietStarInputError(f"next_token_loss_weight {config.next_token_loss_weight}: TRL's GRPO loss has no "
                                  "next-token term; set it to 0, or train with quietstar train")
    G = config.thoughts_per_position
    preset = dict(num_generations=G, per_device_train_batch_size=G,
                  max_completion_length=config.sampled_thought_tokens,
                  temperature=config.thought_temperature, top_p=1.0, top_k=0, min_p=None,
                  beta=0.0, scale_rewards="none", reward_weights=[G / (G - 1) if config.objective == "rlp" else 1.0],
                  loss_type="grpo", importance_sampling_level="token", num_iterations=1,
                  epsilon=config.clip_eps_low, epsilon_high=config.clip_eps_high, mask_truncated_completions=False,
                  learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0)
    preset.update(settings)
    if preset["num_generations"] < 2:
        raise QuietStarInputError(f"num_generations {preset['num_generations']}: the group baseline needs at least 2 "
                                  "thoughts per position")
    return trl.GRPOConfig(**preset)
