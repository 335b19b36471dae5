"""The run folder and the console of ``quietstar train``: checks before writing (not inside another
run, taken with its lock), logging to the console and ``train.log``, Ctrl-C / SIGTERM as a request
to stop after saving, and what a run tells the user at its end (the summary, a stop after
non-finite steps, a push that failed)."""

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

from quietstar.training.checkpoint import PREFIX, STATE_NAME, latest_checkpoint, list_checkpoints, step_of
from quietstar.training.config import TRAIN_CONFIG_NAME
from quietstar.training.metrics import CURVES_NAME, METRICS_NAME, SAMPLES_MD, read_metrics
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


def summary(out_dir: Path, *, last_checkpoint: Path | None, step: int, start_step: int, elapsed: float,
            interrupted: bool) -> str:
    """The end-of-run summary: steps and time; the NLL at the start and end of the whole run, from
    its ``metrics.jsonl`` (which a resumed run continues), training and held-out; the files the
    run folder holds."""
    done = step - start_step
    if interrupted:
        head = f"Interrupted at step {step}; continue with: quietstar train --resume {shlex.quote(str(out_dir))}"
    else:
        head = f"Done: {done} step{'' if done == 1 else 's'} in {format_time(elapsed)}" + (
            f" (steps {start_step + 1}-{step}; resumed at step {start_step})" if start_step and done else "") + "."
    lines = [head]
    records = read_metrics(out_dir / METRICS_NAME)
    trained = [r for r in records if not r.get("skipped") and _numbers(r, "base_nll", "model_nll")]
    n = min(5, len(trained) // 2)  # the two ends never share a step
    if n:
        first, last = trained[:n], trained[-n:]
        lines.append(f"Training NLL, mean of {_steps(first)} -> {_steps(last)}: "
                     f"{_mean(first, 'base_nll'):.3f} -> {_mean(last, 'base_nll'):.3f} without thought, "
                     f"{_mean(first, 'model_nll'):.3f} -> {_mean(last, 'model_nll'):.3f} with thought")
    evals = [r for r in records if _numbers(r, "eval/nll_without_thought", "eval/nll_with_thought")]
    if len(evals) >= 2:
        a, b = evals[0], evals[-1]
        lines.append(f"Held-out NLL, step {a['step']} -> step {b['step']}: "
                     f"{a['eval/nll_without_thought']:.4f} -> {b['eval/nll_without_thought']:.4f} without "
                     f"thought, {a['eval/nll_with_thought']:.4f} -> {b['eval/nll_with_thought']:.4f} with thought")
    elif evals:
        lines.append(f"Held-out NLL at step {evals[0]['step']}: {evals[0]['eval/nll_without_thought']:.4f} "
                     f"without thought, {evals[0]['eval/nll_with_thought']:.4f} with thought")
    lines.append(f"Run folder: {out_dir}")
    if last_checkpoint is not None and (last_checkpoint / "model").is_dir():
        lines.append(f"  {last_checkpoint.name}/model   the trained model "
                     "(QuietStarForCausalLM.from_pretrained)")
    for name, what in ((CURVES_NAME, "the training curves"), (SAMPLES_MD, "sampled thoughts"),
                       (METRICS_NAME, "every step's numbers")):
        if (out_dir / name).is_file():
            lines.append(f"  {name}   {what}")
    return "\n".join(lines)


def _numbers(record: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(record.get(k), (int, float)) and math.isfinite(record[k]) for k in keys)


def _mean(records: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def _steps(records: list[dict[str, Any]]) -> str:
    a, b = records[0]["step"], records[-1]["step"]
    return f"step {a}" if a == b else f"steps {a}-{b}"


def diverged_message(*, step: int, streak: int, saved: Path, last_good: dict[str, Any] | None,
                     start_step: int, weight_scale: tuple[float, float] | None, learning_rate: float) -> str:
    """Why a run stopped after ``streak`` non-finite steps and what its last checkpoint ``saved``
    holds, truthfully: the weights after the last finite step (``last_good``, its record; None:
    none this session), which an exploding but finite loss may already have ruined
    (``weight_scale``: the largest |weight| now and at ``start_step``; None: not known, sharded)."""
    quoted = shlex.quote(str(saved))
    text = (f"stopped at step {step}: {streak} steps in a row had a NaN/inf loss or gradient (skipped: "
            f"they changed no weight). Saved {saved}: ")
    if last_good is not None:
        text += (f"the weights after step {last_good['step']}, the last finite step (loss "
                 f"{last_good['loss']:.4g}, grad norm {_number(last_good.get('grad_norm'))})")
    else:
        text += f"the weights this run started from at step {start_step}"
    damaged = None
    if weight_scale is not None:
        now, start = weight_scale
        text += f", largest |weight| {now:.3g} ({start:.3g} at step {start_step})"
        damaged = not math.isfinite(now) or now > 10 * start
    # A checkpoint saved at or after the last finite step holds these same weights.
    reached = last_good["step"] if last_good is not None else start_step
    earlier = [p for p in list_checkpoints(saved.parent) if step_of(p) < reached]
    fix = (f"Lower --learning-rate (now {learning_rate:g}) or --policy-loss-weight (or use "
           "--precision fp32), then ")
    if damaged is False:
        return text + f". {fix}continue with --resume {quoted}"
    back = (f"resume from a checkpoint saved before step {reached} (kept: "
            f"{', '.join(p.name for p in earlier)}: --resume {shlex.quote(str(earlier[-1]))}), or start afresh"
            if earlier else f"start afresh (no checkpoint from before step {reached} is kept)")
    if damaged:
        return (text + ": the loss was still finite, but the weights were already damaged before the "
                f"first NaN, so resuming from {saved.name} would likely diverge again. {fix}{back}")
    return (text + f". They may already be damaged if the loss was growing before the first NaN (see "
            f"{METRICS_NAME}). {fix}continue with --resume {quoted}, or {back}")


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "n/a"


def push_failed_message(repo_id: str, folder: Path, error: BaseException) -> str:
    """One line for a push that failed at the end of a run: the model stays saved, and the
    command that uploads it later."""
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    return (f"Pushing to the Hub repo {repo_id} failed ({reason}); the model stays saved in {folder}; "
            f"push it later with: hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))} .")
