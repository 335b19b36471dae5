"""quietstar: Quiet-STaR for any Hugging Face causal LM."""

from quietstar.utils.log_filters import drop_deepspeed_cpu_notice

drop_deepspeed_cpu_notice()  # before anything imports DeepSpeed (see quietstar/utils/log_filters.py)

from quietstar.method.config import QuietStarConfig  # noqa: E402
from quietstar.models.modeling import NonFiniteLossError, QuietStarForCausalLM, QuietStarOutput, ThoughtScores  # noqa: E402

__all__ = ["QuietStarConfig", "QuietStarForCausalLM", "QuietStarOutput", "ThoughtScores",
           "NonFiniteLossError"]
__version__ = "0.1.0"
