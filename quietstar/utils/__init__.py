"""Foundations every layer uses: typed settings (dataclass -> flags / YAML / --help), quieter logs, batching, eval mode for a block."""
