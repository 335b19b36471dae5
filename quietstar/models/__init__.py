"""QuietStarForCausalLM, its saved folder and model card, and loading base models."""
