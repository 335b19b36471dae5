"""Foundations every layer uses: typed settings (dataclass -> flags / YAML / --help), quieter logs,
batching, eval mode for a block, the embedded model's names, the Hub's offline and repo-id rules."""
