"""Quiet-STaR in a transformers Trainer pipeline: swap the class, wrap the model.

    python examples/trainer.py --model embedded:smollm2-135m-instruct --max-steps 20 --output-dir runs/trainer

Tested by tests/test_trainer.py::test_example_script_trains_saves_and_reloads (tiny model).
`quietstar train` stays the recommended path (see quietstar/training/hf_trainer.py for what it adds).
"""

import argparse
import itertools

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.data.corpora import heldout_split, load_texts, pack_documents
from quietstar.models.loading import load_base_model
from quietstar.training.hf_trainer import QuietStarTrainer, QuietStarTrainingArguments


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--data", default="builtin:arithmetic")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--output-dir", default="runs/trainer")
    args = p.parse_args(argv)

    lm, tokenizer = load_base_model(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = QuietStarForCausalLM.from_base(lm, tokenizer, QuietStarConfig(
        sampled_thought_tokens=4, policy_loss_weight=100.0))  # the cpu-demo preset's method
    _, train_texts = heldout_split(load_texts(args.data, num_documents=400), 100)
    examples = list(itertools.islice(pack_documents(train_texts, model.tokenizer, args.seq_len), 200))
    training = QuietStarTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=1,
        learning_rate=3e-5, warmup_steps=2, lr_scheduler_type="cosine", logging_steps=5,
        save_steps=args.max_steps, report_to=[], use_cpu=True, mixing_head_lr_multiplier=1.0)
    trainer = QuietStarTrainer(model=model, args=training, train_dataset=examples)
    trainer.train()
    trainer.save_model(args.output_dir)  # QuietStarForCausalLM.from_pretrained(args.output_dir) loads it
    return args.output_dir


if __name__ == "__main__":
    print(main())
