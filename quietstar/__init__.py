"""quietstar: Quiet-STaR for any Hugging Face causal LM."""

from .config import QuietStarConfig
from .modeling import NonFiniteLossError, QuietStarForCausalLM, QuietStarOutput, ThoughtScores

__all__ = ["QuietStarConfig", "QuietStarForCausalLM", "QuietStarOutput", "ThoughtScores",
           "NonFiniteLossError"]
__version__ = "0.1.0"
