"""The Quiet-STaR method's components: the parallel thought rollout, its attention, position selection, the vocabulary head, mixing, the objective, thinking generation."""
