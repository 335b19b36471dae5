"""Development script: does REINFORCE move the scratchpad toy's thoughts toward the partial
products? Trains the shipped base (tests/fixtures/scratchpad-base) with Quiet-STaR, thinking at the
"=" of terse problems only, and prints, every `every` steps, the share of sampled held-out thoughts
that are exactly "p q" (and whose first token is p), then the mixed NLL of the held-out answers with
own / random / shifted thoughts as prototype.py's confirmation does.

    python reinforce.py key=value ...
      seed=1 steps=400 lr=3e-4 pw=1 bw=1 mw=1 tw=0.1 rs=thought T=3 clip=1 wf=0.8
      terse_only=1 every=100 hm=30 mm=1 drop=1 baseline=thought_mean n=2 tt=1.0
      base=<model folder> corpus=decoy (decoy_fraction 0.5, for a base from pretrain.py decoy=0.5)

"""

import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.evaluation.tasks import thoughts_for
from quietstar.training.optim import parameter_groups
from quietstar.data.scratchpad import partial_products, scratchpad_corpus, scratchpad_tokenizer
from quietstar.evaluation.statistics import summarize

torch.set_num_threads(1)
args = dict(a.split("=", 1) for a in sys.argv[1:])
get = lambda k, d: type(d)(args.get(k, d))
SEED, STEPS, EVERY = get("seed", 1), get("steps", 400), get("every", 100)
BASE = args.get("base", Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "scratchpad-base")
if args.get("corpus") == "decoy":  # half the worked scratchpads are decoys "--- a c --- ;"
    scratchpad_corpus = functools.partial(scratchpad_corpus, decoy_fraction=0.5)
L = 64
tok = scratchpad_tokenizer()
EQ, SEMI, DASH = (tok.convert_tokens_to_ids(w) for w in ("=", ";", "---"))
DIGIT = {tok.convert_tokens_to_ids(str(d)): d for d in range(10)}


def batch(docs):
    return torch.tensor([tok(d).input_ids[:L] for d in docs])


def sites(x):  # (row, i): "=" of a terse problem
    return [(b, i) for b in range(x.shape[0]) for i in range(L - 2) if x[b, i] == EQ and x[b, i + 2] == SEMI]


def pq(x, b, i):
    a, bb, c, e = (DIGIT[int(x[b, i - j])] for j in (7, 5, 3, 1))
    p, q, _ = partial_products(a, bb, c, e)
    return tok.convert_tokens_to_ids(str(p)), tok.convert_tokens_to_ids(str(q))


torch.manual_seed(SEED)
config = QuietStarConfig(sampled_thought_tokens=2, ahead_tokens=2, thoughts_per_position=get("n", 2),
                         reward_source=args.get("rs", "thought"), reward_baseline=args.get("baseline", "thought_mean"),
                         policy_loss_weight=get("pw", 1.0), base_loss_weight=get("bw", 1.0),
                         mixed_loss_weight=get("mw", 1.0), thought_loss_weight=get("tw", 0.1),
                         meta_token_lr_multiplier=get("mm", 1.0), policy_logprob_temperature=get("T", 3.0),
                         drop_negative_rewards=args.get("drop", "1") == "1",
                         thought_temperature=get("tt", 1.0))
model = QuietStarForCausalLM.from_base(transformers.AutoModelForCausalLM.from_pretrained(BASE), tok, config)
lr = get("lr", 3e-4)
opt = torch.optim.AdamW(parameter_groups(model, lr, 0.0, get("hm", 30.0)), lr=lr)
train_docs = iter(scratchpad_corpus(16 * (STEPS + 1), seed=SEED, worked_fraction=get("wf", 0.8)))
heldout = batch(scratchpad_corpus(64, seed=10_000 + SEED, worked_fraction=0.0))
pos = sites(heldout)
gen = torch.Generator().manual_seed(SEED)
t0 = time.time()


def content(tag):
    model.eval()
    with torch.no_grad():
        th = thoughts_for(model, heldout, None, 2, "sampled", generator=torch.Generator().manual_seed(7 + SEED))
    model.train()
    hits = np.array([tuple(th[b, i].tolist()) == pq(heldout, b, i) for b, i in pos], dtype=float)
    hit = hits.mean()
    first = np.mean([th[b, i, 0].item() == pq(heldout, b, i)[0] for b, i in pos])
    decoy = np.mean([tuple(th[b, i].tolist()) == (heldout[b, i - 7].item(), heldout[b, i - 3].item()) for b, i in pos])
    ex = [tok.decode(th[b, i]) + f" (p q = {tok.decode(list(pq(heldout, b, i)))})" for b, i in pos[:3]]
    print(tag, "share p q", round(hit, 3), "first = p", round(first, 3), "share a c", round(decoy, 3), ex, round(time.time() - t0), flush=True)
    return hits


shares = {"before": content("step 0")}
model.train()
for step in range(1, STEPS + 1):
    x = batch([next(train_docs) for _ in range(16)])
    think = torch.zeros_like(x, dtype=torch.bool)
    think[:, :-1] = x[:, :-1] == EQ
    if args.get("terse_only", "1") == "1":
        think[:, :-1] &= x[:, 1:] != DASH
    out = model(x, generator=gen, thought_positions=think)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), get("clip", 1.0))
    opt.step()
    if step % 50 == 0:
        m = {k: round(float(v), 3) for k, v in out.metrics.items()
             if k in ("base_nll", "mixed_nll", "thought_nll", "mean_mixing_weight", "mean_reward", "reward_spread")}
        print("step", step, m, flush=True)
    if step % EVERY == 0:
        shares[f"step {step}"] = content(f"step {step}")

model.eval()
nll = {}
with torch.no_grad():
    for src in ("sampled", "random", "shifted"):
        th = thoughts_for(model, heldout, None, 2, src, generator=torch.Generator().manual_seed(99 + SEED))
        sc = model.score_thoughts(heldout, th)
        mixed = sc.mixed_logits[:, :, 0].float().log_softmax(-1)
        nll[src] = np.array([-mixed[b, i, heldout[b, i + 1]].item() for b, i in pos])
    base = sc.base_logits.float().log_softmax(-1)  # the same for every source: no thought
    nll["without"] = np.array([-base[b, i, heldout[b, i + 1]].item() for b, i in pos])
docs_ = np.array([b for b, i in pos])
report = {"args": args, "seed": SEED, "n_answers": len(pos),
          "share_p_q": {k: float(v.mean()) for k, v in shares.items()},
          "share_p_q_after - before": summarize(shares[f"step {STEPS}"] - shares["before"], docs_, 0),
          "nll": {k: summarize(v, docs_, 0) for k, v in nll.items()},
          "own - random": summarize(nll["sampled"] - nll["random"], docs_, 0),
          "own - shifted": summarize(nll["sampled"] - nll["shifted"], docs_, 0),
          "own - without": summarize(nll["sampled"] - nll["without"], docs_, 0)}
print("REPORT", json.dumps(report, default=float))
