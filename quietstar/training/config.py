"""The typed configuration of a training run, its YAML file and its presets.

``TrainConfig`` and the method's ``QuietStarConfig`` (its ``quietstar`` field) are the one source
of truth: the command-line flags, their help and defaults are generated from their fields and
docstrings (``quietstar.utils.settings``), a YAML file uses the same names, and the resolved
configuration is saved with the run and every checkpoint as ``train_config.yaml``.

The defaults are one story: ``QuietStarConfig`` holds the paper's values (the ``paper`` preset);
a preset is a YAML file of settings in ``quietstar/training/presets/``. The settings of a run are
layers, each over the ones before (``load_config``, for ``quietstar train`` and Python alike):

    new run:      the base preset  <  the --config file  <  the flags
    resumed run:  the run's saved settings  <  the --config file  <  the flags

The base preset is ``cpu-demo``, or the preset the file names with ``base: NAME`` (``base:
paper`` starts from the paper's defaults; ``--config PRESET`` is that preset alone). A resumed run's
saved settings already hold its base, so a file's base is not applied again, and the settings
its checkpoint depends on (``RESUME_FIXED``) may not change. ``settings_report`` prints what
differs from the defaults and which layer set it, at the start of every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import yaml

from quietstar.method.config import QuietStarConfig
from quietstar.utils.embedded_model import EMBEDDED_MODEL
from quietstar.utils.hub import valid_repo_id
from quietstar.utils.settings import check_field_types, merge, option, read_yaml
from quietstar.utils.errors import QuietStarInputError

TRAIN_CONFIG_NAME = "train_config.yaml"
PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "cpu-demo"  # the base of a new run, unless its --config file names another
DEFAULTS_PRESET = "defaults"  # the dataclass defaults (the paper's method): no settings of its own
BASE_KEY = "base"            # a settings file's key naming the preset it layers on
# What a resumed run may not change: the data position (seed, seq_len, batch_size, data_mode),
# the LoRA adapter, and how the saved START/END vectors and mixing head are read (the vectors are
# stored divided by meta_token_lr_multiplier). Checked once, when the settings are resolved.
RESUME_FIXED = ("seed", "seq_len", "batch_size", "data_mode", "lora_rank", "lora_alpha",
                "lora_target_modules", "quietstar.meta_token_lr_multiplier",
                "quietstar.mixing_head_hidden_size", "quietstar.mixing_weight_bounded")
INFINITE_OK = ("max_grad_norm", "policy_max_grad_norm")  # inf: no clipping
ReportTo = Literal["none", "tensorboard", "wandb"]
REPORT_TO = get_args(ReportTo)  # where metrics go besides metrics.jsonl (metrics.MetricsLogger)


@dataclass
class TrainConfig:
    """Everything a training run needs; the method's own settings live in ``quietstar``.

    The defaults are the paper's method (``QuietStarConfig()``) on the embedded
    SmolLM2-135M-Instruct: the ``paper`` preset. A new run of ``quietstar train`` (and
    ``load_config``) starts from the ``cpu-demo`` preset instead (``presets/cpu-demo.yaml``:
    shorter thoughts and a policy weight the LM survives on a CPU) and layers a ``--config`` file
    on it, unless the file names another base (``base: defaults``); see ``load_config``.
    """

    model: str = EMBEDDED_MODEL
    """Base model: a Hugging Face model id, a local model folder, or the embedded
    "embedded:smollm2-135m-instruct" (converted once to a cached safetensors folder). A saved
    QuietStar model folder continues with its learned START/END vectors and mixing head."""

    revision: str | None = None
    """For a Hub id as model: the branch, tag or commit to load (None: the default branch)."""

    cache_dir: str | None = None
    """Hugging Face hub cache folder to read a Hub id from (None: the default cache; offline,
    HF_HUB_OFFLINE=1, only from the cache)."""

    data: str = "builtin:arithmetic"
    """Training text: "builtin:arithmetic" (offline), a local .txt/.jsonl/.json/.parquet file or
    folder (a .txt file's documents are separated by blank lines; without one it is one document),
    or a Hugging Face dataset "name" or "name:config" (streamed)."""

    data_split: str = "train"
    """Split of a Hugging Face dataset."""

    text_field: str | None = None
    """Record field holding the text (default "text"; question/answer records are joined)."""

    num_documents: int | None = None
    """Use only the first this many documents (None: all; the built-in corpus makes 2000)."""

    data_mode: Literal["pack", "crop"] = "pack"
    """"pack": documents joined with EOS and cut into seq_len windows. "crop": one document per
    sequence, cut or padded to seq_len (padding is masked out of the loss)."""

    output_dir: str | None = option(None, output="folder")
    """Run folder for checkpoints, metrics, curves and samples (None: runs/quietstar-<time>)."""

    seq_len: int = 32
    """Tokens per training sequence; a thought is sampled after every one of them."""

    batch_size: int = 1
    """Sequences per optimiser step, over all processes and accumulation steps."""

    micro_batch_size: int = 1
    """Sequences per forward pass and process; batch_size / (micro_batch_size * processes)
    passes are accumulated per step."""

    thought_tokens_per_backward: int = 2048
    """rlp / rpt: the thoughts are sampled without gradients, the text pass runs once per
    sequence, and the thoughts are scored and differentiated a group of positions at a time,
    each group's thought passes about this many tokens (at least one position): the same
    gradients as one backward, with the memory of the text pass plus one group's thoughts. 0:
    all thoughts sampled and scored in the same passes, one graph (more memory). Not used by
    the quietstar objective, nor with activation checkpointing."""

    max_steps: int = 20
    """Optimiser steps of the whole run (a resumed run continues up to this)."""

    learning_rate: float = 3e-5
    """Peak AdamW learning rate (fp32 master weights). START/END embeddings learn
    meta_token_lr_multiplier times faster through their parameterisation."""

    mixing_head_lr_multiplier: float = 1.0
    """The mixing head's learning rate is learning_rate times this. The head starts at w = 0 and
    at the LM's small learning rate its weight grows slowly; 1.0 is the paper's setting."""

    weight_decay: float = 0.001
    """AdamW weight decay of matrices; biases, norms and the START/END embeddings get none."""

    warmup_steps: int = 2
    """Steps of linear warm-up from learning_rate / (warmup_steps + 1) to learning_rate."""

    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up, down to min_lr_ratio * learning_rate at max_steps."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of learning_rate (cosine and linear schedules)."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (inf: no clipping). With the paper's policy-loss
    weight (1e6) the gradient is mostly the REINFORCE term, so clipping sets the step size."""

    policy_max_grad_norm: float | None = None
    """None: one gradient for the whole loss, clipped at max_grad_norm (the paper). A number: the
    REINFORCE term's gradient and the NLL terms' gradient are computed apart (a second backward
    pass through the same graph, ~1.5x the step time), the first clipped at this norm and the
    second at max_grad_norm, then summed: the policy can shape thoughts without taking over the
    LM's step, and a large policy weight no longer shrinks the NLL's update. One process only."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision; weights and optimiser state stay fp32. "auto": bf16 autocast on CUDA
    GPUs that support it, fp32 elsewhere."""

    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: much less memory, ~30% more time."""

    lora_rank: int = 0
    """LoRA rank for the base model's linear layers (peft); 0 trains all weights. The mixing
    head and START/END embeddings are always fully trained."""

    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)."""

    lora_target_modules: str = "all-linear"
    """Comma-separated module names to adapt with LoRA, or "all-linear" (every linear layer but
    the LM head)."""

    seed: int = 0
    """Seed of everything random: initialisation, data order and thought sampling."""

    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and always at the end)."""

    keep_checkpoints: int = 2
    """Keep only the newest this many checkpoints."""

    resume: str | None = None
    """Continue a run: a checkpoint folder, a run folder (its latest checkpoint), or "latest"
    (in output_dir). Settings not given again are taken from the checkpoint."""

    sample_every: int = 5
    """Show and save sampled thoughts every this many steps (0: never)."""

    eval_every: int = 10
    """Held-out loss with and without thoughts every this many steps and at the end (0: never)."""

    eval_batches: int = 2
    """Held-out batches of micro_batch_size sequences per evaluation."""

    eval_documents: int | None = option(None, shown_default="a tenth of the documents, at most 100")
    """Documents at the start of the data held out for evaluation (never trained on)."""

    eval_own_minus_shifted: bool = False
    """Also log eval/own_minus_shifted (held-out NLL with the model's own thoughts minus with
    those of another thinking position of the same text, half its thinking positions further on)
    for the quietstar objective; rlp / rpt always log it."""

    report_to: ReportTo = "none"
    """Also send the metrics to TensorBoard (<output_dir>/tensorboard) or Weights & Biases;
    metrics.jsonl is always written."""

    push_to_hub: str | None = None
    """At the end, upload the last checkpoint's model (with its model card) to this Hugging Face
    Hub repo ("owner/name", created if missing). The token (hf auth login, or HF_TOKEN) and the
    Hub are checked before training; an upload that still fails keeps the checkpoint and prints
    the command that pushes it later."""

    max_nonfinite_steps: int = 3
    """Stop (after saving) when this many steps in a row have a NaN/inf loss or gradient; such
    steps are skipped."""

    quietstar: QuietStarConfig = field(default_factory=QuietStarConfig)
    """The method's settings (thought length, ahead tokens, loss weights, ...)."""

    def __post_init__(self) -> None:
        # Types first (a "quietstar" mapping becomes a QuietStarConfig); every float must be
        # finite but the two clipping norms, where inf means "no clipping".
        check_field_types(self, infinite_ok=INFINITE_OK)

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise QuietStarInputError(f"TrainConfig: {message}")

        for name in ("seq_len", "batch_size", "micro_batch_size", "max_steps", "checkpoint_every",
                     "keep_checkpoints", "eval_batches", "max_nonfinite_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "sample_every", "eval_every", "lora_rank", "seed", "thought_tokens_per_backward"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        need(self.eval_documents is None or self.eval_documents >= 1,
             f"eval_documents must be None (a tenth of the documents, at most 100) or >= 1, got "
             f"{self.eval_documents!r}")
        need(self.num_documents is None or self.num_documents >= 1,
             f"num_documents must be None or >= 1, got {self.num_documents!r}")
        need(self.batch_size % self.micro_batch_size == 0,
             f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
             f"{self.micro_batch_size}; make batch_size = micro_batch_size * processes * "
             "accumulation steps")
        try:
            self.quietstar.check_training_length(self.seq_len, "seq_len")
        except QuietStarInputError as e:
            raise QuietStarInputError(f"TrainConfig: {e}") from None
        need(self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning_rate must be finite and > 0, got {self.learning_rate!r}")
        need(self.mixing_head_lr_multiplier > 0 and math.isfinite(self.mixing_head_lr_multiplier),
             f"mixing_head_lr_multiplier must be finite and > 0, got {self.mixing_head_lr_multiplier!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0 (inf: no clipping), got "
             f"{self.max_grad_norm!r}")
        need(self.policy_max_grad_norm is None or self.policy_max_grad_norm > 0,
             f"policy_max_grad_norm must be None or > 0 (inf: separate, unclipped), got "
             f"{self.policy_max_grad_norm!r}")
        need(not (self.lora_rank and self.quietstar.uses_ema_copy),
             "objective='rlp' or reward_baseline='ema_base' with LoRA is not supported (the EMA copy would "
             "follow the frozen base weights); train all weights (--lora-rank 0) or use another objective "
             "or baseline")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        need(self.push_to_hub is None or ("/" in self.push_to_hub and valid_repo_id(self.push_to_hub)),
             f"push_to_hub must be a Hub repo id 'owner/name', got {self.push_to_hub!r}")
        need(bool(self.lora_target_modules.strip()), "lora_target_modules must not be empty")

    @property
    def logs_own_minus_shifted(self) -> bool:
        """Evaluation logs eval/own_minus_shifted: for rlp / rpt (whose thoughts are the point) or
        when asked; the quietstar default skips its cost and keeps its logged keys."""
        return self.eval_own_minus_shifted or self.quietstar.objective != "quietstar"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            method = {f.name for f in fields(QuietStarConfig)}
            hint = [f"{u} belongs under 'quietstar:'" for u in unknown if u in method]
            raise QuietStarInputError(f"unknown training setting(s) {unknown}"
                                      + (f" ({'; '.join(hint)})" if hint else "")
                                      + f"; known: {sorted(known)}")
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, directory: str | Path) -> Path:
        """Writes ``<directory>/train_config.yaml`` (a run folder or a checkpoint)."""
        path = Path(directory, TRAIN_CONFIG_NAME)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @staticmethod
    def saved_settings(directory: str | Path) -> dict[str, Any]:
        """The settings ``save`` wrote into ``directory``, as a dict (to merge, then validate)."""
        return read_yaml(Path(directory, TRAIN_CONFIG_NAME))


def presets() -> list[str]:
    """The names of the shipped presets."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_file_path(name_or_path: str | Path) -> Path:
    """A YAML file of settings: a path, or the name of a shipped preset ("cpu-demo")."""
    if not str(name_or_path).strip():
        raise QuietStarInputError(f"--config is empty; give a YAML file or a preset ({', '.join(presets())})")
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise FileNotFoundError(f"--config {name_or_path}: neither a YAML file nor a preset; "
                                f"presets: {', '.join(presets())}")
    return preset


def names_preset(config_file: str | Path) -> bool:
    """Whether ``config_file``, as ``--config`` takes it, names a shipped preset (not a file)."""
    path = config_file_path(config_file)
    return path.parent.resolve() == PRESETS_DIR.resolve() and str(config_file) == path.stem


@dataclass
class SettingsOrigin:
    """Where the settings of a resolved ``TrainConfig`` came from: its layers, first to last
    ("the cpu-demo preset", "file run.yaml", "flags"), the layer that set each setting (dotted
    names: "seq_len", "quietstar.ahead_tokens"; unset ones are the defaults), and remarks on how
    the layers were chosen."""

    layers: list[str]
    by_setting: dict[str, str]
    remarks: list[str] = field(default_factory=list)


def _dotted(settings: dict[str, Any]) -> list[str]:
    """The settings a (nested) mapping gives, as dotted names."""
    names = []
    for key, value in settings.items():
        if key == "quietstar" and isinstance(value, dict):
            names += [f"quietstar.{name}" for name in value]
        else:
            names.append(str(key))
    return names


def setting(config: TrainConfig, name: str) -> Any:
    """A setting of ``config`` by its dotted name ("quietstar.ahead_tokens")."""
    value: Any = config
    for part in name.split("."):
        value = getattr(value, part)
    return value


def differences(config: TrainConfig, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings (dotted names, in field order) whose values differ: name -> (config's, other's)."""
    mine, theirs = config.to_dict(), other.to_dict()
    flat = {n: (mine[n], theirs[n]) for n in mine if n != "quietstar"}
    flat |= {f"quietstar.{n}": (v, theirs["quietstar"][n]) for n, v in mine["quietstar"].items()}
    return {n: pair for n, pair in flat.items() if pair[0] != pair[1]}


class _SettingsFile(NamedTuple):
    label: str                # "the cpu-demo preset", "file run.yaml"
    settings: dict[str, Any]  # its own, without the base key
    base: str | None          # the preset it names as its base, if it does
    preset: bool              # a shipped preset, named as one


def _settings_file(path: Path, preset: bool) -> _SettingsFile:
    settings = read_yaml(path)
    named = BASE_KEY in settings
    base = settings.pop(BASE_KEY, None)
    if named and (not isinstance(base, str) or base not in presets()):
        raise QuietStarInputError(f"{path}: {BASE_KEY}: {base!r} is not a preset; name the preset the "
                                  f"file's settings layer on, one of {', '.join(presets())} "
                                  f"({DEFAULTS_PRESET}: the dataclass defaults; without '{BASE_KEY}:', "
                                  f"{DEFAULT_PRESET})")
    return _SettingsFile(f"the {path.stem} preset" if preset else f"file {path}", settings, base, preset)


def _preset_layers(name: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The layers of preset ``name``: its base's, then its own settings (``paper``: none)."""
    if name == DEFAULTS_PRESET:
        return []
    if name in seen:
        raise QuietStarInputError(f"preset {name}: its '{BASE_KEY}:' keys form a cycle "
                                  f"({' -> '.join(seen + (name,))})")
    file = _settings_file(PRESETS_DIR / f"{name}.yaml", preset=True)
    return _preset_layers(file.base or DEFAULT_PRESET, seen + (name,)) + [(file.label, file.settings)]


def resolve_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                   resumed_settings: Callable[[str, str | None], dict[str, Any] | None] | None = None,
                   overrides_label: str = "overrides") -> tuple[TrainConfig, SettingsOrigin]:
    """``load_config``'s configuration and where each of its settings came from
    (``overrides_label`` names the overrides' layer, e.g. "flags")."""
    overrides = overrides or {}
    file = None
    if config_file is not None:
        file = _settings_file(config_file_path(config_file), preset=names_preset(config_file))
    base = file.base if file is not None and file.base else DEFAULT_PRESET
    explicit = merge(file.settings if file is not None else {}, overrides)
    saved = None
    if explicit.get("resume"):
        if resumed_settings is None:
            raise QuietStarInputError("load_config: resuming needs resumed_settings="
                                      "quietstar.training.checkpoint.resumed_settings (the resumed run's "
                                      "saved settings)")
        saved = resumed_settings(explicit["resume"], explicit.get("output_dir"))
    remarks = []
    if saved is not None:  # None: "latest" with no checkpoint yet, a new run
        layers = [("the resumed run's saved settings", saved)]
        if file is not None and base != DEFAULTS_PRESET:
            remarks.append(f"resuming: {file.label} applies over the run's saved settings, which hold "
                           f"its base already: the {base} preset is not applied again")
    else:
        layers = _preset_layers(base)
        if file is None:
            remarks.append(f"no --config: a new run starts from the {DEFAULT_PRESET} preset "
                           f"({PRESETS_DIR / DEFAULT_PRESET}.yaml); --config FILE or PRESET for others")
        elif file.base is None and not file.preset:
            remarks.append(f"{file.label} layers on the {DEFAULT_PRESET} preset; to start from the "
                           f"dataclass defaults (the paper's method) instead, put '{BASE_KEY}: {DEFAULTS_PRESET}' in it")
    layers += ([(file.label, file.settings)] if file is not None else []) \
        + ([(overrides_label, overrides)] if overrides else [])
    merged: dict[str, Any] = {}
    by_setting: dict[str, str] = {}
    for layer, settings in layers:
        merged = merge(merged, settings)
        by_setting |= dict.fromkeys(_dotted(settings), layer)
    config = TrainConfig.from_dict(merged)
    if saved is not None:
        _check_resume_fixed(config, TrainConfig.from_dict(saved), by_setting)
    return config, SettingsOrigin([layer for layer, _ in layers], by_setting, remarks)


def _check_resume_fixed(config: TrainConfig, saved: TrainConfig, by_setting: dict[str, str]) -> None:
    """Refuses a change of a ``RESUME_FIXED`` setting on resume, naming the layer that made it."""
    unused = ("lora_alpha", "lora_target_modules") if not saved.lora_rank else ()  # no adapter to fit
    changed = [f"{name} (the run's {setting(saved, name)!r}, {setting(config, name)!r} from "
               f"{by_setting.get(name, 'the given settings')})"
               for name in RESUME_FIXED if name not in unused and setting(config, name) != setting(saved, name)]
    if changed:
        raise QuietStarInputError(f"a resumed run cannot change {'; '.join(changed)}: {resume_rule()}; "
                                  "resume without changing them, or start a new run (another "
                                  "--output-dir, no --resume; --model CHECKPOINT/model starts from "
                                  "its language model)")


def resume_rule() -> str:
    """Which settings a resumed run may change, in words (for messages)."""
    return ("on resume, flags and --config apply over the run's saved settings, and every setting "
            "may change (max_steps, learning_rate, the loss weights, eval_every, ...) but "
            + ", ".join(RESUME_FIXED) + ", which the checkpoint's data position and weights depend "
            "on; the model must keep the checkpoint's architecture")


def settings_report(config: TrainConfig, origin: SettingsOrigin | None = None) -> str:
    """The settings of a run that differ from the defaults (the paper's method), with the value,
    the default and the layer each came from, as lines of text (printed as a run starts)."""
    given = origin is None  # a TrainConfig given to train(): no layers to name
    origin = origin or SettingsOrigin(["given to train()"], {})
    lines = [f"Settings: {' < '.join(origin.layers)} (each layer over the ones before; the "
             "defaults are the paper's method)", *[f"  ({r})" for r in origin.remarks]]
    rows = [(name, _shown(value), _shown(default),
             origin.by_setting.get(name, "given to train()" if given else "chosen by the run"))
            for name, (value, default) in differences(config, TrainConfig()).items()]
    if not rows:
        return "\n".join(lines + ["  every setting is the default"])
    header = ("setting", "value", "default", "from")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(3)]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def load_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                resumed_settings: Callable[[str, str | None], dict[str, Any] | None] | None = None) -> TrainConfig:
    """The settings ``quietstar train`` runs with, for ``config_file`` (a YAML file's path or a
    preset's name, or None) and ``overrides`` (the flags: ``{"seq_len": 32, "quietstar":
    {"ahead_tokens": 2}}``), each layer over the ones before:

    * a new run: the ``cpu-demo`` preset (or the preset the file names with ``base: NAME``;
      ``base: defaults`` is the dataclass defaults, ``TrainConfig()``) < the file < ``overrides``.
      A preset given as ``config_file`` is that preset alone (``"defaults"``: ``TrainConfig()``).
    * a resumed run (a ``resume`` setting): the settings the run was trained with < the file's
      own settings (its base is not applied again: the saved settings hold it) < ``overrides``;
      a change of a ``RESUME_FIXED`` setting is refused. ``resumed_settings(resume, output_dir)``
      reads them: ``quietstar.training.checkpoint.resumed_settings``, which knows checkpoint
      folders (this module sits below them); None from it (``"latest"`` with no checkpoint yet)
      makes a new run.

    ``resolve_config`` also says where each setting came from (``settings_report`` prints it)."""
    return resolve_config(config_file, overrides, resumed_settings=resumed_settings)[0]
