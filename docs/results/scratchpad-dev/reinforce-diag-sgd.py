"""Development check: does REINFORCE alone (plain SGD, lr given as fused:LR or replay:LR) raise the
share of "p q" thoughts on one fixed batch? replay: the thoughts are replayed so their log-probs come
from the scored passes rather than the sampling."""
import sys, torch, numpy as np, transformers
mode = sys.argv[1]
sys.argv=["x", "bw=0", "mw=0", "tw=0"]
from pathlib import Path
__file__ = str(Path(__file__).resolve().parent / "reinforce.py")  # its setup: model, data, helpers
exec(open(__file__).read().split("shares = {")[0])
x = batch([next(train_docs) for _ in range(32)])
think = torch.zeros_like(x, dtype=torch.bool); think[:, :-1] = (x[:, :-1] == EQ) & (x[:, 1:] != DASH)
S = [(b, i) for b, i in sites(x) if think[b, i]]
def share():
    model.eval()
    with torch.no_grad():
        th = thoughts_for(model, x, None, 2, "sampled", generator=torch.Generator().manual_seed(3), thought_positions=think)
    model.train()
    return np.mean([tuple(th[b, i].tolist()) == pq(x, b, i) for b, i in S])
sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(mode.split(":")[1]))
for it in range(31):
    if it % 5 == 0: print(it, "share on this batch", round(share(), 3), flush=True)
    out = model(x, generator=gen, thought_positions=think)
    if mode.startswith("replay"):
        out = model(x, thought_ids=out.thought_ids.detach(), thought_positions=think)
    sgd.zero_grad(); out.terms["policy"].backward(); sgd.step()
