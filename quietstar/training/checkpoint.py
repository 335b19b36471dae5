"""Training checkpoints: written atomically, resumed exactly, the last K kept.

A checkpoint is a folder ``<run>/checkpoint-<step>/``:

    model/               the trained model, ``QuietStarForCausalLM.from_pretrained(...)`` loads it
                         (with LoRA: the adapter merged into the base weights)
    adapter/             LoRA only: the unmerged peft adapter, what a resumed run continues from
    training_state.pt    step, optimiser state, RNG states, data position, model fingerprint
    checksums.json       the SHA-256 of every other file, verified before anything is loaded
    train_config.yaml    the resolved training configuration (``TrainConfig.save``)
    accelerate_state/    FSDP / DeepSpeed only: the sharded model and optimiser (accelerate)

``save_checkpoint`` and ``load_checkpoint`` are the one place that writes and reads this
protocol: the folder is written into a hidden temporary folder next to its final place, every
file is fsync'ed, and only then is the folder renamed: a crash mid-write leaves the previous
checkpoints intact and at worst a ``.tmp-*`` folder, which the next run removes. Only what
this protocol wrote is ever deleted: a checkpoint folder holding anything else (a user's notes,
an evaluation's output) is kept, with a warning, when rotation or a rewrite of its step would
delete it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from quietstar.models import saved_model
from quietstar.models.modeling import QuietStarForCausalLM
from quietstar.training.config import TRAIN_CONFIG_NAME, TrainConfig, differences, resume_rule
from quietstar.utils.log_filters import quiet_transformers
from quietstar.utils.errors import QuietStarInputError

PREFIX = "checkpoint-"
STATE_NAME = "training_state.pt"
CHECKSUMS_NAME = "checksums.json"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
SHARDED_DIR = "accelerate_state"
PROTOCOL_NAMES = (MODEL_DIR, ADAPTER_DIR, STATE_NAME, CHECKSUMS_NAME, TRAIN_CONFIG_NAME, SHARDED_DIR)
FORMAT = 1
_NAME = re.compile(rf"^{PREFIX}(\d+)$")

logger = logging.getLogger(__name__)


class CheckpointError(QuietStarInputError):
    """A checkpoint is missing, corrupt or does not fit the model being trained."""


# ------------------------------------------------------------------------------ finding them
def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"  # zero-padded: folders sort by step


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: str | Path | None) -> Path | None:
    """The checkpoint folder ``resume`` points at: a checkpoint folder, a run folder (its latest
    checkpoint), or ``"latest"``: the latest checkpoint in ``output_dir``, None while it holds
    none (a new run: the same command starts a run, then continues it)."""
    if resume == "latest":
        if output_dir is None:
            raise CheckpointError("--resume latest needs --output-dir (the run folder to continue); "
                                  "or pass the run or checkpoint folder itself: --resume PATH")
        return latest_checkpoint(output_dir)
    path = Path(resume).expanduser()
    if _NAME.match(path.name) and path.is_dir():
        return path
    if path.is_dir() and (found := latest_checkpoint(path)) is not None:
        return found
    raise CheckpointError(f"--resume {resume}: not a checkpoint folder or a run folder holding "
                          "checkpoint-* folders; pass one of those, or 'latest' with --output-dir")


def resumed_settings(resume: str, output_dir: str | Path | None) -> dict[str, Any] | None:
    """The settings of the checkpoint ``resume`` points at (see ``resolve_resume``), as a dict
    for ``load_config`` to merge under the given ones, with ``output_dir`` its run folder; None
    for ``"latest"`` with no checkpoint yet (a new run). The file is checked against the
    checkpoint's checksums first: an edited or damaged one is refused before it is used."""
    found = resolve_resume(resume, output_dir)
    if found is None:
        return None
    if not (found / TRAIN_CONFIG_NAME).is_file():
        raise CheckpointError(f"{found / TRAIN_CONFIG_NAME} is missing: {found} is not a complete "
                              "checkpoint (every checkpoint holds the settings it was trained "
                              f"with); {_recovery(found)}")
    verify_checksums(found, only=(TRAIN_CONFIG_NAME,))
    settings = TrainConfig.saved_settings(found)
    settings["output_dir"] = str(found.parent)  # robust to a moved run folder / another cwd
    return settings


def step_of(checkpoint: str | Path) -> int:
    match = _NAME.match(Path(checkpoint).name)
    if match is None:
        raise CheckpointError(f"{checkpoint} is not named {PREFIX}<step>")
    return int(match.group(1))


def remove_partial(run_dir: str | Path) -> None:
    """Delete temporary folders left by a save that crashed before its rename."""
    for p in Path(run_dir).glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------ atomic writes
def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        fsync(path)
    fsync(folder)


def fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (an atomic write's steps are durable in order)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_folder(run_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before its rename (a fixed name, so that every
    process of a distributed run writes into the same one)."""
    return run_dir / f".tmp-{checkpoint_name(step)}"


def begin(run_dir: str | Path, step: int) -> Path:
    """Creates the (empty) temporary folder of checkpoint ``step`` and returns it."""
    tmp = temp_folder(Path(run_dir), step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: str | Path, step: int, keep: int | None) -> Path:
    """fsyncs the temporary folder, renames it into place and deletes all but the last ``keep``
    (None: none) of the checkpoints that hold only what this protocol wrote (``foreign_files``)."""
    run_dir = Path(run_dir)
    tmp, final = temp_folder(run_dir, step), run_dir / checkpoint_name(step)
    _fsync_tree(tmp)
    if final.exists():  # a previous run reached this step: replace it, never half-way
        old = run_dir / f".tmp-{checkpoint_name(step)}-old"
        shutil.rmtree(old, ignore_errors=True)
        foreign = foreign_files(final)
        if foreign:  # not ours alone: set it aside under a name no run lists
            old = run_dir / f"{final.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}"
            logger.warning(f"{final} holds files a checkpoint does not ({', '.join(foreign)}): kept "
                           f"as {old.name} instead of being replaced")
        os.rename(final, old)
        os.rename(tmp, final)
        if not foreign:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync(run_dir)  # make the rename itself durable
    for stale in list_checkpoints(run_dir)[:-keep] if keep else []:
        foreign = foreign_files(stale)
        if foreign:
            logger.warning(f"kept {stale} (beyond --keep-checkpoints {keep}): it holds files a "
                           f"checkpoint does not ({', '.join(foreign)}); delete it yourself when done")
        else:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def foreign_files(checkpoint: Path, shown: int = 3) -> list[str]:
    """What ``checkpoint`` holds besides what ``save_checkpoint`` wrote: the files its
    checksums.json lists and their folders (a checkpoint from before checksums: the protocol's
    top-level names, with its training state). The first ``shown`` paths, then how many more."""
    try:
        written = set(json.loads((checkpoint / CHECKSUMS_NAME).read_text(encoding="utf-8")))
    except FileNotFoundError:
        written = None
    except (OSError, ValueError, TypeError):
        return [f"an unreadable {CHECKSUMS_NAME}"]
    if written is None:
        if not (checkpoint / STATE_NAME).is_file():
            return [f"no {STATE_NAME}"]
        extra = sorted(p.name for p in checkpoint.iterdir() if p.name not in PROTOCOL_NAMES)
    else:
        allowed = {CHECKSUMS_NAME} | written | {folder for name in written for folder in _folders_of(name)}
        extra = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*"))
        extra = [name for name in extra if name not in allowed]
        extra = [name for name in extra if not any(name.startswith(e + "/") for e in extra)]  # a folder, not its files
    return extra[:shown] + ([f"{len(extra) - shown} more"] if len(extra) > shown else [])


def _folders_of(relative: str) -> list[str]:
    parts = relative.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


# ------------------------------------------------------------------------------ model weights
def _is_peft(lm) -> bool:
    return hasattr(lm, "peft_config") and hasattr(lm, "get_base_model")


def merged_lora_state_dict(peft_lm) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA update added in, under the plain names.

    Computed from the live weights (nothing is merged in place), so training continues on the
    unmerged adapter exactly as before.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_lm.get_base_model()
    adapter = peft_lm.active_adapter
    deltas = {name: module.get_delta_weight(adapter) for name, module in base.named_modules()
              if isinstance(module, LoraLayer) and adapter in module.lora_A}
    merged = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        module_name, _, leaf = plain.rpartition(".")
        if leaf == "weight" and module_name in deltas:
            value = value + deltas[module_name].to(value.dtype)
        merged[plain] = value.detach()
    return merged


def save_model(model: QuietStarForCausalLM, directory: str | Path,
               state_dict: dict[str, torch.Tensor] | None = None, training=None) -> None:
    """Writes ``model`` in the ``QuietStarForCausalLM.save_pretrained`` format (its model card
    with ``training``, a ``model_card.TrainingFacts``, if given).

    ``state_dict`` (the full state dict of ``model``, e.g. gathered from FSDP / ZeRO-3 shards)
    replaces the live parameters. A LoRA model is written with the adapter merged in, so
    ``QuietStarForCausalLM.from_pretrained`` loads it like any other.
    """
    with quiet_transformers():
        if state_dict is None and not _is_peft(model.lm):
            model.save_pretrained(directory, training=training)
        else:
            _save_pieces(model, Path(directory), state_dict, training)


def save_adapter(model: QuietStarForCausalLM, directory: str | Path) -> None:
    """LoRA only: the unmerged peft adapter (what a resumed run continues from)."""
    with quiet_transformers():
        model.lm.save_pretrained(directory)


def _save_pieces(model: QuietStarForCausalLM, directory: Path,
                 state_dict: dict[str, torch.Tensor] | None, training=None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if _is_peft(model.lm):
        lm, lm_state = model.lm.get_base_model(), merged_lora_state_dict(model.lm)
    else:
        lm = model.lm
        lm_state = {k.removeprefix("lm."): v for k, v in state_dict.items() if k.startswith("lm.")}
    lm.save_pretrained(directory, state_dict=lm_state)
    saved_model.save_method_files(model, directory, state_dict, training)


def _read_safetensors(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob(pattern))
    if not files:
        raise CheckpointError(f"{folder} holds no {pattern} weights: they are missing, the checkpoint "
                              f"is incomplete; delete {folder.parent} to resume from an earlier one")
    tensors = {}
    for file in files:
        try:
            tensors |= load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is corrupt ({e}); delete {folder.parent} to resume from "
                                  "an earlier checkpoint, or start a fresh run") from None
    return tensors


def load_model_weights(model: QuietStarForCausalLM, checkpoint: str | Path, model_dir: str = MODEL_DIR) -> None:
    """Loads the trained weights of ``checkpoint`` into a freshly built ``model`` (the same base
    model, LoRA settings and method config as the run that wrote it); the saved model is in
    ``checkpoint / model_dir`` ("." for a folder that is itself a saved model)."""
    checkpoint = Path(checkpoint)
    try:
        head = saved_model.read_head_file(checkpoint / model_dir)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e}; the checkpoint is incomplete: delete {checkpoint} to resume "
                              "from an earlier one") from None
    except ValueError as e:
        raise CheckpointError(f"{e}; delete {checkpoint} to resume from an earlier checkpoint, "
                              "or start a fresh run") from None
    try:
        saved_model.load_head_state_dict(model, head)
    except ValueError as e:
        raise _mismatch(checkpoint, e) from None
    if _is_peft(model.lm):
        from peft import set_peft_model_state_dict

        adapter = _read_safetensors(checkpoint / ADAPTER_DIR, "adapter_model*.safetensors")
        try:
            result = set_peft_model_state_dict(model.lm, adapter)
        except RuntimeError as e:
            raise _mismatch(checkpoint, e) from None
        if getattr(result, "unexpected_keys", None):
            raise _mismatch(checkpoint, f"unexpected adapter weights {result.unexpected_keys[:3]}")
        return
    weights = _read_safetensors(checkpoint / model_dir, "model*.safetensors")  # not the head file
    weights = {k: v for k, v in weights.items() if not k.startswith(saved_model.HEAD_KEY_PREFIXES)}
    try:
        missing, unexpected = model.lm.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise _mismatch(checkpoint, e) from None
    # Tied weights (e.g. an LM head sharing the embedding) are saved once; they count as loaded.
    params = model.lm.state_dict(keep_vars=True)
    loaded = {params[k].data_ptr() for k in weights if k in params}
    missing = [k for k in missing if params[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise _mismatch(checkpoint, f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def _mismatch(checkpoint: Path, error: Any) -> CheckpointError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(f"{checkpoint} does not fit the model being trained ({first}); it was "
                           "written by a run with another base model or settings: resume with "
                           "that run's --model (its train_config.yaml), or start a fresh run")


# ------------------------------------------------------------------------------ training state
def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, in a form ``torch.load`` accepts with
    ``weights_only=True``."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save({"format": FORMAT, **state}, folder / STATE_NAME)


def load_training_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_NAME
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {checkpoint} is not a complete training "
                              "checkpoint; delete it to resume from an earlier one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged zip/pickle
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {str(e)[:200]}); delete "
                              f"{checkpoint} to resume from an earlier checkpoint, or start a "
                              "fresh run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a quietstar training state of format {FORMAT}; "
                              "start a fresh run")
    return state


def check_fingerprint(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuses a checkpoint written for another model before any weight is touched."""
    different = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if different:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in different.items())
        raise CheckpointError(f"{checkpoint} was written for another model ({detail}); resume "
                              "with the same --model and settings as that run (see its "
                              "train_config.yaml), or start a fresh run without --resume")



# ------------------------------------------------------------------------------ checksums
def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder: Path) -> Path:
    """``<folder>/checksums.json``: the SHA-256 of every file under ``folder``, by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_NAME)
    sums = {p.relative_to(folder).as_posix(): _sha256(p) for p in files}
    path = folder / CHECKSUMS_NAME
    path.write_text(json.dumps(sums, indent=1) + "\n", encoding="utf-8")
    return path


def verify_checksums(checkpoint: Path, only: tuple[str, ...] | None = None) -> None:
    """CheckpointError naming the first file of ``checkpoint`` (of those named in ``only``, if
    given) that is missing or whose bytes changed since it was written (a checkpoint from before
    checksums existed is not checked). A changed ``train_config.yaml`` that still holds valid
    settings is reported as edited by hand, with how to change settings on resume instead."""
    path = checkpoint / CHECKSUMS_NAME
    if not path.exists():
        return
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); {_recovery(checkpoint)}") from None
    for name, digest in sums.items():
        if only is not None and name not in only:
            continue
        file = checkpoint / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete: {_recovery(checkpoint)}")
        if _sha256(file) != digest:
            if name == TRAIN_CONFIG_NAME:
                raise _changed_settings(checkpoint, digest)
            raise CheckpointError(f"{file} has changed since it was written (its SHA-256 does not "
                                  f"match {CHECKSUMS_NAME}): the file is damaged; {_recovery(checkpoint)}")


def _changed_settings(checkpoint: Path, digest: str) -> CheckpointError:
    """The error for a checkpoint's train_config.yaml whose bytes changed: edited by hand (it
    still holds valid settings) or damaged; either way it can be put back from the run folder's
    copy when that is the original."""
    file, run_copy = checkpoint / TRAIN_CONFIG_NAME, checkpoint.parent / TRAIN_CONFIG_NAME
    original = run_copy.is_file() and _sha256(run_copy) == digest
    restore = f"the run folder's copy is the original: cp {run_copy} {file} puts it back"
    try:
        edited = TrainConfig.from_dict(TrainConfig.saved_settings(checkpoint))
    except (ValueError, TypeError) as e:
        return CheckpointError(f"{file} has changed since it was written (its SHA-256 does not match "
                               f"{CHECKSUMS_NAME}) and no longer holds valid settings ({e}): "
                               + (restore if original else _recovery(checkpoint)))
    changes, undo = "", f"put back the values you changed: the file is compared byte for byte with {CHECKSUMS_NAME}"
    if original:
        names = ", ".join(differences(TrainConfig.from_dict(TrainConfig.saved_settings(checkpoint.parent)),
                                      edited)) or "formatting only"
        changes, undo = f" (changed: {names})", restore
    return CheckpointError(
        f"{file} was edited after the checkpoint was written{changes}: it holds valid settings, but "
        f"a checkpoint's train_config.yaml records what it was trained with and is not read as "
        f"settings to change. Undo the edit ({undo}); to change settings, give them when resuming: "
        f"quietstar train --resume {checkpoint} --max-steps N ... (flags) or --config FILE; {resume_rule()}")


def _recovery(checkpoint: Path) -> str:
    """What to do about a damaged ``checkpoint``: resume from an earlier one where there is one,
    never delete the run's only checkpoint."""
    named = _NAME.match(checkpoint.name)
    if named is None:
        return "resume from another checkpoint, or start a new run"
    others = [c for c in list_checkpoints(checkpoint.parent) if c.name != checkpoint.name]
    earlier = [c for c in others if step_of(c) < int(named.group(1))]
    if earlier:
        return (f"delete {checkpoint} (or move it out of {checkpoint.parent}) to resume from "
                f"{earlier[-1].name}, an earlier checkpoint")
    if others:
        return f"resume from another checkpoint of the run: --resume {others[-1]}"
    return (f"{checkpoint.name} is the run's only checkpoint, so keep it (restore the file from a "
            "backup if you have one) and start a new run in another --output-dir")


# ------------------------------------------------------------------------------ the protocol
def save_checkpoint(run_dir: str | Path, step: int, model: QuietStarForCausalLM, *,
                    training_state: dict[str, Any], config, keep: int | None,
                    full_state: dict[str, torch.Tensor] | None = None, lora: bool = False,
                    save_sharded=None, is_main: bool = True, barrier=None, training=None) -> Path:
    """Writes checkpoint ``step`` of the run in ``run_dir`` and returns its folder.

    Temporary folder -> model -> adapter (LoRA) -> training state -> config (``config.save``)
    -> fsync and atomic rename -> older checkpoints beyond ``keep`` deleted (None: none; see
    ``commit``). In a distributed
    run every process calls it: ``save_sharded(folder)`` (FSDP / DeepSpeed: accelerate's
    ``save_state``) runs on every process, the rest on the main one, and ``barrier`` (accelerate's
    ``wait_for_everyone``) orders the two. ``full_state`` is the gathered full state dict of a
    sharded model (it replaces the live parameters).
    """
    run_dir, barrier = Path(run_dir), barrier or (lambda: None)
    if is_main:
        begin(run_dir, step)
    barrier()
    tmp = temp_folder(run_dir, step)
    if save_sharded is not None:
        save_sharded(tmp / SHARDED_DIR)
    if is_main:
        save_model(model, tmp / MODEL_DIR, full_state, training)
        if lora:
            save_adapter(model, tmp / ADAPTER_DIR)
        save_training_state(tmp, training_state)
        config.save(tmp)
        write_checksums(tmp)
        commit(run_dir, step, keep)
    barrier()
    return run_dir / checkpoint_name(step)


def load_checkpoint(checkpoint: str | Path, model: QuietStarForCausalLM, fingerprint: dict[str, Any],
                    *, optimizer=None, load_sharded=None) -> dict[str, Any]:
    """Reads checkpoint ``checkpoint`` back into ``model`` (and ``optimizer``) and returns its
    training state (step, data position, RNG states, ...), for the caller to restore last.

    The fingerprint is checked before any weight is touched. ``load_sharded(folder)``
    (FSDP / DeepSpeed: accelerate's ``load_state``) replaces loading the model and optimiser."""
    checkpoint = Path(checkpoint)
    verify_checksums(checkpoint)  # before any file is read (the sharded state is unpickled)
    state = load_training_state(checkpoint)
    check_fingerprint(checkpoint, state["fingerprint"], fingerprint)
    if load_sharded is not None:
        load_sharded(checkpoint / SHARDED_DIR)
        return state
    load_model_weights(model, checkpoint)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"the optimiser state in {checkpoint} does not fit this model ({e}); "
                                  "resume with that run's settings, or start a fresh run") from None
    return state
