"""RLP with TRL's GRPOTrainer: quietstar's positions, reward and preset in TRL's engine.

    python examples/trl_rlp.py --max-steps 3          # CPU: the embedded SmolLM2, HF generate

The method's settings are those of the rlp preset (`quietstar train --config rlp`: G = 4 thoughts
per position, information gain against an EMA copy, temperature 0.7, horizon 1, two random
positions per document), read from it rather than copied; --thought-tokens shortens the thought
for a quick run. The GPU path is the same script under accelerate with vLLM generating the
thoughts (TRL's colocate mode; not runnable on a CPU, and not run by the tests):

    accelerate launch --config_file examples/ddp.yaml examples/trl_rlp.py --use-vllm \
        --model HuggingFaceTB/SmolLM2-135M-Instruct --seq-len 2048 --thought-tokens 2048 --max-steps 1000

Tested by tests/test_trl_grpo.py::test_example_runs_a_few_grpo_steps (tiny model, two steps).
"""

import argparse
import dataclasses

from quietstar.models.loading import load_base_model
from quietstar.training import trl_grpo
from quietstar.training.config import load_config


def main(argv=None) -> dict:
    preset = load_config("rlp")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=preset.model)
    p.add_argument("--data", default=preset.data)
    p.add_argument("--seq-len", type=int, default=preset.seq_len)
    p.add_argument("--thought-tokens", type=int, default=preset.quietstar.sampled_thought_tokens)
    p.add_argument("--max-steps", type=int, default=3)
    p.add_argument("--output-dir", default="runs/trl-rlp")
    p.add_argument("--use-vllm", action="store_true", help="generate the thoughts with vLLM (GPU; TRL's colocate mode)")
    args = p.parse_args(argv)
    trl = trl_grpo.require_trl()

    config = dataclasses.replace(preset.quietstar, sampled_thought_tokens=args.thought_tokens)
    lm, tokenizer = load_base_model(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = trl_grpo.prepare_policy(lm, tokenizer, config)
    data = trl_grpo.position_dataset(args.data, tokenizer, config, seq_len=args.seq_len,
                                     positions_per_document=config.thought_count, seed=preset.seed)
    reward = trl_grpo.ThoughtReward(tokenizer, config)
    vllm = {"use_vllm": True, "vllm_mode": "colocate"} if args.use_vllm else {"use_cpu": True, "bf16": False}
    grpo = trl_grpo.grpo_config(config, output_dir=args.output_dir, max_steps=args.max_steps,
                                learning_rate=preset.learning_rate, save_steps=args.max_steps, logging_steps=1,
                                report_to="none", seed=preset.seed, **vllm)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward, args=grpo, train_dataset=data["train"],
                              processing_class=tokenizer, callbacks=[reward.callback])
    trainer.train()
    return {"global_step": trainer.state.global_step, "output_dir": args.output_dir,
            "rewards": [log[key] for log in trainer.state.log_history for key in log if key.endswith("reward/mean")]}


if __name__ == "__main__":
    print(main())
