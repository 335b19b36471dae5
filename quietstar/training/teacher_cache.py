"""The teacher cache of ``quietstar distill --teacher-cache DIR``: the teacher's top-k
log-probabilities of every step's positions, written once, read by the steps instead of the teacher,
and grown when a run (a resumed one) asks for more steps than it was made for.

The folder:

    teacher_cache.json        what the cache was made from (teacher and its weights' SHA-256, data,
                              num_documents, seq_len, batch_size, seed, top_k, temperature,
                              thought_fraction, steps) and its shards; written last (a temporary
                              file, then os.replace): a folder without it is incomplete
    shard-00000.safetensors   the steps [first, first + n): ids [rows, k] int32, logprobs [rows, k]
                              float32 (log p_t at temperature T), rest [rows] float32 (log of the
                              mass outside the k ids), offsets [n + 1] int64 (step j's rows are
                              offsets[j]:offsets[j + 1]), inputs [n, 32] uint8 (SHA-256 of the
                              step's batch, checked when read)

Rows are a step's positions with a next token, in the order of ``hidden[valid]`` (batch-major),
so a step reads its rows without knowing the others (resume reads from any step). Shards hold
about ``SHARD_BYTES`` each and are read a step's slice at a time (``safe_open``), so memory does
not grow with the run. On disk: 8k + 4 bytes per token.

Growing (``CacheWriter(..., extends=cache)``): a complete cache made for the same run but fewer
steps gets the missing steps as new shard files, then a new index replaces the old one. Until that
replace the old index lists only the old shards, so an interruption leaves the old cache, valid;
the next growth removes the unlisted shards it left and writes them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quietstar.training.checkpoint import fsync
from quietstar.utils.errors import QuietStarInputError

INDEX_NAME = "teacher_cache.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
SHARD_BYTES = 256 * 2 ** 20  # about this much per shard file (a shard is built in memory, then written)
FORMAT = 1
# What must match between the cache and the run (``steps`` fewer than max_steps: the cache grows).
MATCHED = ("teacher_sha256", "data", "num_documents", "seq_len", "batch_size", "seed", "top_k", "temperature",
           "thought_fraction")


def weights_sha256(model: torch.nn.Module, settings: dict[str, Any]) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes, bytes) and its method ``settings``: the
    teacher as loaded, wherever it came from (a folder, a Hub repo, a moved copy)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batch_sha256(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[32] uint8: SHA-256 of a batch's input ids, attention mask and labels."""
    digest = hashlib.sha256()
    for key in ("input_ids", "attention_mask", "labels"):
        digest.update(batch[key].detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / INDEX_NAME).is_file()


class CacheWriter:
    """Appends steps in order (``add``), a shard file every ``steps_per_shard`` steps; ``finish``
    writes the index, which makes the cache complete. Files of an earlier incomplete write are
    removed first; a folder holding anything else is refused.

    With ``extends`` (the complete cache of ``folder``, checked against the run's ``made_from``)
    the steps continue its own (the first ``add`` is step ``extends.steps``) in new shard files;
    ``finish`` replaces its index by one listing its shards and the new ones (``made_from``: the
    run's, equal to the cache's in ``MATCHED``). Shard files its index does not list (an
    interrupted growth's) are removed first."""

    def __init__(self, folder: str | Path, made_from: dict[str, Any], rows_per_step: int, *,
                 extends: TeacherCache | None = None):
        self.folder = Path(folder)
        if extends is not None:
            listed = {s["file"] for s in extends.shards}
            for stale in self.folder.iterdir():
                if _is_shard(stale.name) and stale.name not in listed:
                    stale.unlink()
            self.shards, self.steps = list(extends.shards), extends.steps
        else:
            if self.folder.exists() and not self.folder.is_dir():
                raise QuietStarInputError(f"--teacher-cache {folder} is a file; give a folder")
            self.folder.mkdir(parents=True, exist_ok=True)
            others = [p.name for p in self.folder.iterdir() if not _is_shard(p.name)]
            if others:
                raise QuietStarInputError(f"--teacher-cache {folder} holds other files "
                                          f"({', '.join(sorted(others)[:3])}) and no {INDEX_NAME}; give an empty "
                                          "or new folder")
            for stale in self.folder.iterdir():  # an interrupted write: its shards are rewritten
                stale.unlink()
            self.shards, self.steps = [], 0
        self.made_from = made_from
        step_bytes = rows_per_step * (8 * made_from["top_k"] + 4)
        self.steps_per_shard = max(1, SHARD_BYTES // max(step_bytes, 1))
        self.pending: list[tuple[torch.Tensor, ...]] = []

    def add(self, batch: dict[str, torch.Tensor], ids: torch.Tensor, logprobs: torch.Tensor,
            rest: torch.Tensor) -> None:
        """The next step: its batch and its rows' top-k ids [N, k], log-probabilities [N, k], rest [N]."""
        self.pending.append((batch_sha256(batch), ids.to("cpu", torch.int32), logprobs.to("cpu", torch.float32),
                             rest.to("cpu", torch.float32)))
        self.steps += 1
        if len(self.pending) == self.steps_per_shard:
            self._write_shard()

    def _write_shard(self) -> None:
        inputs, ids, logprobs, rest = zip(*self.pending)
        rows = torch.tensor([0] + [len(r) for r in rest]).cumsum(0)
        name = SHARD_PATTERN.format(len(self.shards))  # a grown cache's old shards are 0..n-1
        save_file({"ids": torch.cat(ids), "logprobs": torch.cat(logprobs), "rest": torch.cat(rest), "offsets": rows,
                   "inputs": torch.stack(inputs)}, self.folder / name)
        fsync(self.folder / name)  # on disk before an index lists it
        self.shards.append({"file": name, "first_step": self.steps - len(self.pending), "steps": len(self.pending),
                            "rows": int(rows[-1])})
        self.pending = []

    def finish(self) -> None:
        if self.pending:
            self._write_shard()
        index = {"format": FORMAT, "made_from": self.made_from | {"steps": self.steps}, "shards": self.shards}
        temp = self.folder / f".{INDEX_NAME}.tmp"
        temp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        fsync(temp)
        os.replace(temp, self.folder / INDEX_NAME)  # the old index or the new one, never half of one
        fsync(self.folder)


def _is_shard(name: str) -> bool:
    """A file an interrupted write leaves: a shard or the index's temporary file."""
    return (name.startswith("shard-") and name.endswith(".safetensors")) or name == f".{INDEX_NAME}.tmp"


class TeacherCache:
    """A complete cache, checked against the run's ``made_from`` (all but its steps: ``steps``
    says how many it holds); ``read(step, batch)`` gives that step's rows, ``check_text(step,
    batch)`` only checks that step's batch."""

    def __init__(self, folder: str | Path, made_from: dict[str, Any]):
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / INDEX_NAME).read_text(encoding="utf-8"))
            saved, self.shards = index["made_from"], index["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QuietStarInputError(f"--teacher-cache {folder}: {INDEX_NAME} is unreadable ({e}); delete the "
                                      "folder to write the cache again") from None
        for key in MATCHED:
            if saved.get(key) != made_from[key]:
                raise QuietStarInputError(
                    f"--teacher-cache {folder} was made with {key} {saved.get(key)!r}, this run has "
                    f"{made_from[key]!r}; give another --teacher-cache folder (a new one is written) or "
                    "delete this one to rewrite it")
        self.made_from = saved
        self.steps = int(saved.get("steps", 0))

    def read(self, step: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``step``'s (ids [N, k] int32, log p_t [N, k], log p_t(rest) [N]), on the CPU; refused
        when ``batch`` is not the batch the cache was made from."""
        path, j = self._locate(step)
        try:
            with safe_open(path, framework="pt") as f:
                offsets = f.get_slice("offsets")[j:j + 2]
                inputs = f.get_slice("inputs")[j:j + 1][0]
                a, b = int(offsets[0]), int(offsets[1])
                out = f.get_slice("ids")[a:b], f.get_slice("logprobs")[a:b], f.get_slice("rest")[a:b]
        except (OSError, ValueError) as e:
            raise self._unreadable(path, e) from None
        self._check_inputs(step, inputs, batch)
        return out

    def check_text(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        """Refuses ``batch`` when it is not step ``step``'s batch the cache was made from (reads
        only the step's 32-byte digest)."""
        path, j = self._locate(step)
        try:
            with safe_open(path, framework="pt") as f:
                inputs = f.get_slice("inputs")[j:j + 1][0]
        except (OSError, ValueError) as e:
            raise self._unreadable(path, e) from None
        self._check_inputs(step, inputs, batch)

    def _locate(self, step: int) -> tuple[Path, int]:
        """The shard file holding step ``step`` and the step's place in it."""
        shard = next((s for s in self.shards if s["first_step"] <= step < s["first_step"] + s["steps"]), None)
        if shard is None:
            raise QuietStarInputError(f"--teacher-cache {self.folder} has no step {step + 1}")
        return self.folder / shard["file"], step - shard["first_step"]

    @staticmethod
    def _unreadable(path: Path, error: Exception) -> QuietStarInputError:
        return QuietStarInputError(f"--teacher-cache {path} is unreadable ({error}); delete the folder to write "
                                   "the cache again")

    def _check_inputs(self, step: int, inputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        if not torch.equal(inputs, batch_sha256(batch)):
            raise QuietStarInputError(f"--teacher-cache {self.folder}: step {step + 1}'s text is not the text the "
                                      "cache was made from (the data changed?); delete the folder to write the "
                                      "cache again")
