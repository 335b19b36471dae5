"""Development check: are the thought-alone rewards and the REINFORCE gradient of the right sign?
Prints a training batch's thoughts with their post-thought log-likelihoods, then the change of the
thought log-probs after one small step on the policy term alone."""
import sys, torch, numpy as np, transformers
sys.argv=["x", "bw=0", "mw=0", "tw=0"]
from pathlib import Path
__file__ = str(Path(__file__).resolve().parent / "reinforce.py")  # its setup: model, data, helpers
exec(open(__file__).read().split("shares = {")[0])
import quietstar.models.modeling as M
cap = {}
orig = M.quietstar_loss_terms
def spy(cfg, logp, ema=None):  # the loss takes the step's StepLogprobs
    cap.update(thought=logp.thought, after=logp.after, tvalid=logp.thought_valid, valid=logp.target_valid)
    return orig(cfg, logp, ema)
M.quietstar_loss_terms = spy
x = batch([next(train_docs) for _ in range(32)])
think = torch.zeros_like(x, dtype=torch.bool); think[:, :-1] = (x[:, :-1] == EQ) & (x[:, 1:] != DASH)
S = [(b, i) for b, i in sites(x) if think[b, i]]
out = model(x, generator=gen, thought_positions=think)
th = out.thought_ids  # [B, n, L, k]
n = th.shape[1]
after = cap["after"].view(32, n, 64, -1); tl = cap["thought"].view(32, n, 64, -1)
for b, i in S[:8]:
    for j in range(n):
        print((b, i), "thought", tok.decode(th[b, j, i]), "pq", tok.decode(list(pq(x, b, i))), "after_ll", [round(v, 2) for v in after[b, j, i].tolist()], "thought_logp", [round(v, 2) for v in tl[b, j, i].tolist()], "targets", tok.decode(x[b, i+1:i+3]))
print("---- gradient direction check")
ids = out.thought_ids.detach()
def tlogp():
    cap.clear(); o = model(x, thought_ids=ids, thought_positions=think); return cap["thought"].view(32, n, 64, -1).detach().clone(), o
before, o = tlogp()
# reward per thought from after_ll
after = cap["after"].view(32, n, 64, -1).sum(-1)
adv = (after - after.mean(1, keepdim=True)).clamp(min=0)
params = [p for p in model.parameters() if p.requires_grad]
o.terms["policy"].backward()
with torch.no_grad():
    for p in params:
        if p.grad is not None: p -= 1e-3 * p.grad
after_step, _ = tlogp()
d = (after_step - before).mean(-1)  # [B, n, L]
m = think[:, None, :].expand_as(d)
pos_adv = (adv > 0.5) & m; zero_adv = (adv == 0) & m
print("mean change of thought logp where advantage>0.5", d[pos_adv].mean().item(), "n", pos_adv.sum().item())
print("where advantage==0", d[zero_adv].mean().item(), "n", zero_adv.sum().item())
