"""The run folder and the console of ``quietstar train``: checks before writing (not inside another
run, taken with its lock), logging to the console and ``train.log``, Ctrl-C / SIGTERM as a request
to stop after saving, and what a run tells the user at its end (the summary, a push that
failed)."""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from quietstar.training.checkpoint import PREFIX, STATE_NAME, latest_checkpoint, list_checkpoints
from quietstar.training.config import TRAIN_CONFIG_NAME
from quietstar.training.metrics import CURVES_NAME, METRICS_NAME, SAMPLES_MD
from quietstar.training.run_lock import LOCK_NAME, RunFolderInUse, RunLock, acquire
from quietstar.utils.errors import QuietStarInputError

LOG_NAME = "train.log"


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
    console, file = _TqdmHandler(), logging.FileHandler(output_dir / LOG_NAME, encoding="utf-8")
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


def enclosing_run(path: str | Path) -> Path | None:
    """The run folder or checkpoint folder ``path`` lies inside, if any (its nearest such parent)."""
    for parent in Path(path).expanduser().resolve().parents:
        if is_run_folder(parent):
            return parent
    return None


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a training run or is a checkpoint: its lock, a checkpoint folder,
    or a ``train_config.yaml`` beside what a run or a checkpoint writes with it (a lone
    ``train_config.yaml`` may be a user's settings file)."""
    try:
        if (folder / LOCK_NAME).exists() or list_checkpoints(folder):
            return True
        return (folder / TRAIN_CONFIG_NAME).is_file() and any(
            (folder / name).exists() for name in (LOG_NAME, METRICS_NAME, STATE_NAME))
    except OSError:  # a parent this user may not list
        return False


def refuse_nested(path: Path) -> None:
    """Refuses an output folder inside another run's folder or a checkpoint: that run's files and
    this one's would mix, and its checkpoint rotation or a rewrite of its step could delete it."""
    outer = enclosing_run(path)
    if outer is None:
        return
    if outer.name.startswith(PREFIX):
        where = f"the checkpoint {outer} (of the run {outer.parent})"
    else:
        where = f"the run folder {outer}"
    raise QuietStarInputError(f"--output-dir {path} lies inside {where}; a run folder must not be "
                              "inside another run or checkpoint: choose a folder outside it")


def claim_output_dir(path: Path, resuming: bool) -> tuple[RunLock, Path | None]:
    """Main process: creates the run folder, takes its lock (``run_lock``: before anything else is
    written there) and refuses a folder that holds a run unless resuming. Returns the lock and the
    topmost folder this call created (None: it existed), which the caller may remove again while
    it holds the lock."""
    try:
        created = make_folders(path)
        lock = acquire(path)
    except RunFolderInUse:
        raise
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {path} "
                              f"({e.strerror or e}); choose another --output-dir") from None
    latest = latest_checkpoint(path)
    if latest is not None and not resuming:
        lock.release()
        raise QuietStarInputError(f"{path} already holds a run ({latest.name}); continue it with "
                                  f"--resume latest --output-dir {path}, or choose another --output-dir")
    return lock, created


def make_folders(path: Path) -> Path | None:
    """``path`` and its missing parents; returns the topmost folder this call created (one created
    by another process meanwhile is not counted: it is not this run's to remove)."""
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = None
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue
        created = created or folder
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder")
    return created


def check_writable(path: Path, rank: int) -> None:
    """A process other than the main one: the run folder (made by the main one) is writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {path} "
                              f"({e.strerror or e}); choose another --output-dir") from None


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


def push_failed_message(repo_id: str, folder: Path, error: BaseException) -> str:
    """One line for a push that failed at the end of a run: the model stays saved, and the
    command that uploads it later."""
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    return (f"Pushing to the Hub repo {repo_id} failed ({reason}); the model stays saved in {folder}; "
            f"push it later with: hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))} .")
