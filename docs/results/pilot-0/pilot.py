import time, torch
torch.set_num_threads(2)
from quietstar.training.recipe import TrainConfig, train
cfg = TrainConfig(data="../shared/data/gsm8k/train.jsonl", output_dir="/tmp/pilot/run1", seq_len=64, batch_size=1,
  max_steps=3, learning_rate=1e-5, warmup_steps=1, eval_every=3, eval_batches=1, eval_documents=60, sample_every=0,
  checkpoint_every=1000, keep_checkpoints=1)
t=time.time(); r=train(cfg); print("total", time.time()-t, r.metrics)
