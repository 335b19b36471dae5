"""Development: pretrains a tiny Llama on builtin:scratchpad as a plain LM (base B: wf=0.8; the
decoy base: wf=0.8 decoy=0.5 threads=2, see README.md). Options key=value: h layers steps lr b wf
decoy threads out."""
import random, time, sys, torch, transformers, numpy as np, math
from quietstar.data.scratchpad import scratchpad_corpus, scratchpad_tokenizer, scratchpad_problem
args = dict(a.split("=") for a in sys.argv[1:])
torch.set_num_threads(int(args.get("threads", 1)))
DECOY = float(args.get("decoy", 0.0))
H = int(args.get("h", 128)); LAYERS = int(args.get("layers", 2)); STEPS = int(args.get("steps", 2000)); LR = float(args.get("lr", 2e-3)); B = int(args.get("b", 32)); L = 64
tok = scratchpad_tokenizer()
SEMI, DASH = tok.convert_tokens_to_ids(";"), tok.convert_tokens_to_ids("---")
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=24, hidden_size=H, intermediate_size=4 * H, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
lm = transformers.LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(lm.parameters(), lr=LR, weight_decay=0.01)
docs = iter(scratchpad_corpus(10**6, seed=0, worked_fraction=float(args.get("wf", 0.5)), decoy_fraction=DECOY))
def batch(B):
    return torch.tensor([tok(next(docs)).input_ids[:L] for _ in range(B)])
r = random.Random(99)
terse = torch.tensor([tok(" ".join(scratchpad_problem(r, False) for _ in range(8))).input_ids[:L] for _ in range(64)])
worked = torch.tensor([tok(" ".join(scratchpad_problem(r, True, DECOY) for _ in range(8))).input_ids[:L] for _ in range(64)])
def ev():
    with torch.no_grad():
        lt, lw = lm(terse).logits.log_softmax(-1), lm(worked).logits.log_softmax(-1)
    out = {}
    for name, x, lp in (("terse", terse, lt), ("worked", worked, lw)):
        d, p, q = [], [], []
        for b in range(x.shape[0]):
            ids = x[b].tolist()
            for j, t in enumerate(ids):
                if t == SEMI and j >= 2:
                    d.append(-lp[b, j - 2, ids[j - 1]].item())
                if name == "worked" and t == DASH and j + 3 < L and ids[j + 3] == DASH:
                    p.append(-lp[b, j, ids[j + 1]].item()); q.append(-lp[b, j + 1, ids[j + 2]].item())
        out[name + "_d"] = round(np.mean(d), 3)
        if p: out["p"], out["q"] = round(np.mean(p), 3), round(np.mean(q), 3)
    return out
t = time.time()
for step in range(STEPS + 1):
    lr = LR * min(1, step / 100) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
    for g in opt.param_groups: g["lr"] = lr
    x = batch(B)
    loss = lm(x, labels=x).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0); opt.step()
    if step % 250 == 0:
        print(step, round(loss.item(), 3), ev(), round(time.time() - t), flush=True)
lm.save_pretrained(args.get("out", "/tmp/toy/base")); tok.save_pretrained(args.get("out", "/tmp/toy/base"))
