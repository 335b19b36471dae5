"""Quiet runs: what transformers and DeepSpeed print that says nothing to a quietstar user.

* ``quiet_transformers()``: no progress bars or info logs of transformers while quietstar loads
  or saves local files (every command loads a model; training saves checkpoints).
* ``drop_deepspeed_cpu_notice()``: accelerate and transformers import DeepSpeed whenever it is
  installed (e.g. inside ``save_pretrained``), and on a machine without CUDA its import logs
  "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
  it." although no DeepSpeed config is in use. A filter on DeepSpeed's logger drops that one
  message; every other DeepSpeed log is kept.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


class _DropCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEEPSPEED_CPU_NOTICE)


def drop_deepspeed_cpu_notice() -> None:
    """Installs the filter on the "DeepSpeed" logger (once; it survives DeepSpeed's own setup of
    that logger, which sets its level and handlers but keeps its filters)."""
    log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropCpuNotice) for f in log.filters):
        log.addFilter(_DropCpuNotice())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' info/warning logs and progress bars ("Loading weights", "Writing model
    shards") silenced while local files are read or written, the previous settings restored
    after. Python warnings are left alone."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_on = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    # The legacy GGUF reader uses tqdm directly; route it through transformers' switchable tqdm.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except Exception:  # pragma: no cover - module layout differs between versions
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_on:
            hf_logging.enable_progress_bar()
        if hub_bars_off:
            disable_progress_bars()
        elif are_progress_bars_disabled():
            enable_progress_bars()
        hf_logging.set_verbosity(verbosity)
