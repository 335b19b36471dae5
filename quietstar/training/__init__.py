"""quietstar train: the recipe, its settings and presets, optimiser, checkpoints, run folder, metrics, distributed and CPU set-up, and the transformers Trainer adapter."""
