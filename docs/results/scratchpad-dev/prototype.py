import random, time, sys, math, torch, transformers, numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from quietstar import QuietStarForCausalLM, QuietStarConfig
from quietstar.training.optim import parameter_groups
from quietstar.evaluation.tasks import thoughts_for
torch.set_num_threads(1)
args = dict(a.split("=") for a in sys.argv[1:])
H = int(args.get("h", 128)); LAYERS = int(args.get("layers", 2)); PRE = int(args.get("pre", 2000)); QS = int(args.get("qs", 300))
WORDS = ["<pad>", "<eos>", "---"] + list("0123456789") + ["*", "+", "=", ";"]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=None))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
def problem(rng, worked):
    a, b, c, e = (rng.randrange(10) for _ in range(4))
    p, q = a * b % 10, c * e % 10; d = (p + q) % 10
    return f"{a} * {b} + {c} * {e} = " + (f"--- {p} {q} --- " if worked else "") + f"{d} ;"
def doc(rng, worked=None):
    worked = rng.random() < float(args.get("wf", 0.5)) if worked is None else worked
    return " ".join(problem(rng, worked) for _ in range(8))
L = 64
def batch(rng, B, worked=None):
    return torch.tensor([tok(doc(rng, worked)).input_ids[:L] for _ in range(B)])
EQ, SEMI = tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids(";")
def answer_positions(x):  # (b, i): position i is '=' of a jump problem, x[b, i+1] = d
    out = []
    for b in range(x.shape[0]):
        ids = x[b].tolist()
        out += [(b, i) for i in range(L - 2) if ids[i] == EQ and ids[i + 2] == SEMI]
    return out
def pq(x, b, i):  # a*b%10, c*e%10 of the problem whose '=' is at i
    a, bb, c, e = x[b, i - 7], x[b, i - 5], x[b, i - 3], x[b, i - 1]
    dig = lambda t: int(tok.convert_ids_to_tokens(int(t)))
    return dig(a) * dig(bb) % 10, dig(c) * dig(e) % 10
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=24, hidden_size=H, intermediate_size=4 * H, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
lm = transformers.LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.01)
SEED = int(args.get('seed', 0))
rng = random.Random(SEED)
heldout = batch(random.Random(123 + 1000 * SEED), 64, worked=False)
pos = answer_positions(heldout)
def base_eval(lm):
    with torch.no_grad(): lp = lm(heldout).logits.log_softmax(-1)
    return np.mean([-lp[b, i, heldout[b, i + 1]].item() for b, i in pos])
t = time.time()
import os
if os.path.exists(f"/tmp/toy/base_{H}_{LAYERS}_{PRE}"):
    lm = transformers.LlamaForCausalLM.from_pretrained(f"/tmp/toy/base_{H}_{LAYERS}_{PRE}"); PRE = -1
for step in range(PRE + 1):
    x = batch(rng, 32)
    loss = lm(x, labels=x).loss
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 500 == 0:
        print("pre", step, round(loss.item(), 3), "jump-d nll", round(base_eval(lm), 3), round(time.time() - t), flush=True)
if PRE >= 0: lm.save_pretrained(f"/tmp/toy/base_{H}_{LAYERS}_{PRE}")
print("base jump-d nll", base_eval(lm))
qcfg = QuietStarConfig(meta_token_lr_multiplier=float(args.get("mm", 100)), mixing_weight_bounded=args.get("bounded", "0") == "1", sampled_thought_tokens=2, ahead_tokens=int(args.get("A", 2)), thoughts_per_position=2,
                       policy_loss_weight=float(args.get("pw", 1.0)), base_loss_weight=1.0, mixed_loss_weight=1.0,
                       reward_source=args.get("rs", "mixed"), thought_loss_weight=float(args.get("tw", 0)), mixing_head_hidden_size=None)
model = QuietStarForCausalLM.from_base(lm, tok, qcfg)
if args.get("leaky") == "1":
    import types
    def weight(self, hb, ht):
        o = self.mlp(torch.cat([hb, ht], -1)).squeeze(-1)
        return torch.where(o > 0, o, 0.01 * o)
    model.mixing_head.weight = types.MethodType(weight, model.mixing_head)
def content_eval(model, tag):
    g = torch.Generator().manual_seed(7)
    model.eval()
    res = {}
    with torch.no_grad():
        for src in ("sampled", "random", "shifted"):
            th = thoughts_for(model, heldout, None, 2, src, generator=torch.Generator().manual_seed(7 + SEED))
            sc = model.score_thoughts(heldout, th)
            lp = sc.logits.log_softmax(-1) if hasattr(sc, "logits") else None
            res[src] = sc
            if src == "sampled":
                hit = np.mean([list(th[b, i].tolist()) == [tok.convert_tokens_to_ids(str(v)) for v in pq(heldout, b, i)] for b, i in pos])
                hit1 = np.mean([th[b, i, 0].item() == tok.convert_tokens_to_ids(str(pq(heldout, b, i)[0])) for b, i in pos])
                ex = [tok.decode(th[b, i]) + " | p,q=" + str(pq(heldout, b, i)) for b, i in pos[:4]]
    print(tag, "thought=(p,q) rate", round(hit, 3), "first=p", round(hit1, 3), ex)
    oracle = th.clone()
    for b, i in pos:
        p_, q_ = pq(heldout, b, i); oracle[b, i, 0] = tok.convert_tokens_to_ids(str(p_)); oracle[b, i, 1] = tok.convert_tokens_to_ids(str(q_))
    with torch.no_grad(): res["oracle"] = model.score_thoughts(heldout, oracle)
    print(tag, "w at answers", round(np.mean([res["sampled"].mixing_weight[b, i, 0].item() for b, i in pos]), 3))
    for src, sc in res.items():
        fields = {k: v for k, v in vars(sc).items() if torch.is_tensor(v)}
        out = []
        for k, v in fields.items():
            if v.shape[-1] >= 20:
                lp = (v[:, :, 0] if v.dim() == 4 else v).float().log_softmax(-1)
                out.append((k, round(np.mean([-lp[b, i, heldout[b, i + 1]].item() for b, i in pos]), 3)))
        print(tag, src, out)
    model.train()
content_eval(model, "init")
groups = parameter_groups(model, float(args.get("lr", 1e-3)), 0.0, float(args.get("hm", 30)))
opt = torch.optim.AdamW(groups, lr=float(args.get("lr", 1e-3)))
g = torch.Generator().manual_seed(SEED)
torch.manual_seed(SEED)
model.train()
for step in range(QS + 1):
    x = batch(rng, 16)
    if args.get("mask") == "1":
        tp = torch.zeros_like(x, dtype=torch.bool)
        tp[:, :-1] = (x[:, :-1] == EQ)
        if args.get("terse_only") == "1":  # not where the text itself writes the scratchpad next
            tp[:, :-1] &= x[:, 1:] != tok.convert_tokens_to_ids("---")
        out = model(x, generator=g, thought_positions=tp)
    else:
        out = model(x, generator=g)
    opt.zero_grad(); out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 50 == 0:
        m = {k: round(float(v), 3) for k, v in out.metrics.items() if k in ("base_nll", "mixed_nll", "thought_nll", "mean_mixing_weight", "thought_gain", "mean_reward")}
        print("qs", step, m, round(time.time() - t), flush=True)
    if step % int(args.get('every', 100)) == 0 and step: content_eval(model, f"step{step}")

from quietstar.evaluation.statistics import summarize
import json
model.eval()
nll = {}
with torch.no_grad():
    for src in ("sampled", "random", "shifted"):
        th = thoughts_for(model, heldout, None, 2, src, generator=torch.Generator().manual_seed(99 + SEED))
        sc = model.score_thoughts(heldout, th)
        mixed = sc.mixed_logits[:, :, 0].float().log_softmax(-1)
        base = sc.base_logits.float().log_softmax(-1)
        nll[src] = np.array([-mixed[b, i, heldout[b, i + 1]].item() for b, i in pos])
        nll["without"] = np.array([-base[b, i, heldout[b, i + 1]].item() for b, i in pos])
docs_ = np.array([b for b, i in pos])
report = {"seed": SEED, "n_answers": len(pos), "n_documents": int(np.unique(docs_).size),
          "nll": {k: summarize(v, docs_, 0) for k, v in nll.items()},
          "own - random": summarize(nll["sampled"] - nll["random"], docs_, 0),
          "own - shifted": summarize(nll["sampled"] - nll["shifted"], docs_, 0),
          "own - without": summarize(nll["sampled"] - nll["without"], docs_, 0)}
print("REPORT", json.dumps(report, default=float))
