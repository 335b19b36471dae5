"""Quiet-STaR in a transformers Trainer pipeline: swap the class, wrap the model.

    python examples/trainer.py --model embedded:smollm2-135m-instruct --max-steps 20 --output-dir runs/trainer

The settings are those of the cpu-demo preset, what `quietstar train` starts from (the method,
the mixing head's learning-rate multiplier, learning rate, warm-up, decay and clipping), read
from it rather than copied. What differs is Trainer's: its warm-up rises from 0 (quietstar's
from learning_rate / (warmup_steps + 1)), and it runs on the CPU with one sequence per step.

Tested by tests/test_trainer.py::test_example_script_trains_saves_and_reloads (tiny model).
`quietstar train` stays the recommended path (see quietstar/training/hf_trainer.py for what it adds).
"""

import argparse
import itertools

from quietstar import QuietStarForCausalLM
from quietstar.data.corpora import heldout_split, load_texts, pack_documents
from quietstar.models.loading import load_base_model
from quietstar.training.config import DEFAULT_PRESET, TrainConfig, load_config
from quietstar.training.hf_trainer import QuietStarTrainer, QuietStarTrainingArguments


def training_arguments(preset: TrainConfig, output_dir: str, max_steps: int) -> QuietStarTrainingArguments:
    """Trainer's arguments with the preset's optimiser settings."""
    return QuietStarTrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=1,
        learning_rate=preset.learning_rate, weight_decay=preset.weight_decay,
        warmup_steps=preset.warmup_steps, max_grad_norm=preset.max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": preset.min_lr_ratio},
        mixing_head_lr_multiplier=preset.mixing_head_lr_multiplier,
        logging_steps=5, save_steps=max_steps, report_to=[], use_cpu=True)


def main(argv=None) -> str:
    preset = load_config(DEFAULT_PRESET)  # what `quietstar train` starts from
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=preset.model)
    p.add_argument("--data", default=preset.data)
    p.add_argument("--seq-len", type=int, default=preset.seq_len)
    p.add_argument("--max-steps", type=int, default=preset.max_steps)
    p.add_argument("--output-dir", default="runs/trainer")
    args = p.parse_args(argv)

    lm, tokenizer = load_base_model(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = QuietStarForCausalLM.from_base(lm, tokenizer, preset.quietstar)
    _, train_texts = heldout_split(load_texts(args.data, num_documents=400), 100)
    examples = list(itertools.islice(pack_documents(train_texts, model.tokenizer, args.seq_len), 200))
    training = training_arguments(preset, args.output_dir, args.max_steps)
    trainer = QuietStarTrainer(model=model, args=training, train_dataset=examples)
    trainer.train()
    trainer.save_model(args.output_dir)  # QuietStarForCausalLM.from_pretrained(args.output_dir) loads it
    return args.output_dir


if __name__ == "__main__":
    print(main())
