"""The run folder and the console of ``quietstar train``: checks before writing, logging to the
console and ``train.log``, Ctrl-C / SIGTERM as a request to stop after saving, the summary."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from quietstar.training.checkpoint import latest_checkpoint
from quietstar.training.metrics import CURVES_NAME, METRICS_NAME, SAMPLES_MD
from quietstar.utils.errors import QuietStarInputError


class StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, exit. A second
    Ctrl-C aborts at once without saving."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logging.getLogger("quietstar.training.recipe").warning(
            "Stopping: finishing this step, then saving a checkpoint (Ctrl-C again aborts without saving)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _TqdmHandler(logging.Handler):
    """Log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def run_logging(logger: logging.Logger, output_dir: Path, enabled: bool):
    """INFO logs of ``logger`` to the console and ``<output_dir>/train.log`` (main process)."""
    if not enabled:
        yield
        return
    console, file = _TqdmHandler(), logging.FileHandler(output_dir / "train.log", encoding="utf-8")
    console.setFormatter(logging.Formatter("%(message)s"))
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(console)
    logger.addHandler(file)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        for handler in (console, file):
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def prepare_output_dir(path: Path, resuming: bool, rank: int) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {path} "
                              f"({e.strerror or e}); choose another --output-dir") from None
    latest = latest_checkpoint(path)
    if latest is not None and not resuming:
        raise QuietStarInputError(f"{path} already holds a run ({latest.name}); continue it with "
                                  f"--resume latest --output-dir {path}, or choose another --output-dir")


def format_time(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def running_mean(values: list[float], last: int = 5) -> float:
    tail = [v for v in values[-last:] if math.isfinite(v)]
    return sum(tail) / len(tail) if tail else float("nan")


def summary(out_dir: Path, last_checkpoint: Path | None, step: int, total: float,
            history: dict[str, list[float]], first_eval: dict[str, float], record: dict[str, Any],
            interrupted: bool, start_step: int) -> str:
    """The end-of-run summary: steps and time, NLL before and after, what the run folder holds."""
    head = (f"Interrupted at step {step}; continue with: quietstar train --resume {out_dir}"
            if interrupted else f"Done: {step - start_step} steps in {format_time(total)}.")
    lines = [head]
    if len(history["base_nll"]) >= 2:
        first, last = history["base_nll"][:5], history["base_nll"]
        lines.append(f"Training NLL (mean of 5 steps): {running_mean(first):.3f} -> {running_mean(last):.3f}"
                     f" without thought, {running_mean(history['model_nll'][:5]):.3f} -> "
                     f"{running_mean(history['model_nll']):.3f} with thought")
    if "eval/nll_with_thought" in first_eval and "eval/nll_with_thought" in record:
        lines.append(f"Held-out NLL: {first_eval['eval/nll_without_thought']:.4f} -> "
                     f"{record['eval/nll_without_thought']:.4f} without thought, "
                     f"{first_eval['eval/nll_with_thought']:.4f} -> "
                     f"{record['eval/nll_with_thought']:.4f} with thought")
    lines.append(f"Run folder: {out_dir}")
    if last_checkpoint is not None:
        lines.append(f"  {last_checkpoint.name}/model   the trained model "
                     "(QuietStarForCausalLM.from_pretrained)")
    lines += [f"  {CURVES_NAME}   the training curves", f"  {SAMPLES_MD}   sampled thoughts",
              f"  {METRICS_NAME}   every step's numbers"]
    return "\n".join(lines)
