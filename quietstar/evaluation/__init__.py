"""Scores and analysis: GSM8K / CommonsenseQA, lm-eval, per-token analysis, the evidence experiments' definitions, statistics, plots, the thought viewer."""
