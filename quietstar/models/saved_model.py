"""A saved QuietStar model's files: the folder ``save_pretrained`` writes and ``from_pretrained``
reads (local or a Hub repo), and the head file.

A saved model is the base LM's own files (``config.json``, safetensors weights), the tokenizer
with the meta tokens and its tokenization check, ``quietstar_config.json``, the head file and
the model card. ``quietstar_head.safetensors`` holds what the method adds to the LM: the
START/END vectors (as stored, divided by ``meta_token_lr_multiplier``) and the mixing head; this
module owns its name and keys. ``QuietStarForCausalLM``'s ``save_pretrained``,
``from_pretrained`` and ``push_to_hub`` delegate here; training checkpoints call the functions
directly. The model class is passed in (``load_pretrained``), never imported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quietstar.method.config import QUIETSTAR_CONFIG_NAME, QuietStarConfig
from quietstar.models.model_card import CARD_NAME, TrainingFacts, render_card
from quietstar.utils.hub import is_hub_id, offline
from quietstar.utils.log_filters import quiet_transformers
from quietstar.models.tokenizer_files import load_tokenizer, save_tokenization_check, verify_tokenization
from quietstar.models.weight_files import load_causal_lm
from quietstar.utils.errors import QuietStarInputError

HEAD_WEIGHTS_NAME = "quietstar_head.safetensors"
# The head file's keys: the START/END vectors under one name, the mixing head's parameters under
# its prefix (HEAD_KEY_PREFIXES: what a reader of LM weights leaves out).
META_VECTORS_KEY = "meta_embeddings.scaled_vectors"
MIXING_HEAD_PREFIX = "mixing_head."
HEAD_KEY_PREFIXES = ("meta_embeddings.", MIXING_HEAD_PREFIX)


# ---------------------------------------------------------------------- the folder
def save_pretrained(model, directory: str | Path, training: TrainingFacts | None = None) -> None:
    """Writes the base LM (safetensors), tokenizer, QuietStar config, learned head and the model
    card (with ``training``'s facts if given) of ``model`` (a QuietStarForCausalLM)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.lm.save_pretrained(directory)
        save_method_files(model, directory, training=training)


def save_method_files(model, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                      training: TrainingFacts | None = None) -> None:
    """Everything of a saved model but the LM's weights: the tokenizer (with the meta tokens) and
    its tokenization check, ``quietstar_config.json``, the head file (from ``state_dict`` if
    given, see ``head_state_dict``) and the model card (with ``training``'s facts)."""
    model.tokenizer.save_pretrained(directory)
    save_tokenization_check(model.tokenizer, directory)
    model.config.save(directory)
    save_head(model, directory, state_dict)
    Path(directory, CARD_NAME).write_text(render_card(model, training), encoding="utf-8")


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload Quiet-STaR model", folder: str | Path | None = None) -> str:
    """Uploads to the Hugging Face Hub repo ``repo_id`` (created if missing): a saved ``folder``
    as it is (e.g. a training checkpoint's model, with its card), else ``model`` saved afresh.
    Returns the repo's URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            save_pretrained(model, tmp)
            folder = tmp
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message)
    return str(url)


def load_pretrained(model_class, name_or_path: str | Path, *, revision: str | None = None,
                    cache_dir: str | Path | None = None, local_files_only: bool | None = None,
                    token: str | bool | None = None, **model_kwargs):
    """``model_class.from_pretrained`` (see there): the saved folder (or Hub repo) as a
    ``model_class`` built with its ``from_base``, the head file loaded into it."""
    directory = _local_folder(name_or_path, revision, cache_dir, local_files_only, token)
    for name in (QUIETSTAR_CONFIG_NAME, HEAD_WEIGHTS_NAME, "config.json"):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} is not a saved QuietStar model: {name} is missing "
                                    "(save one with QuietStarForCausalLM.save_pretrained)")
    if "torch_dtype" in model_kwargs:  # the name transformers 4 used for dtype
        model_kwargs.setdefault("dtype", model_kwargs.pop("torch_dtype"))
    config = QuietStarConfig.load(directory)
    with quiet_transformers():
        tokenizer = load_tokenizer(directory)
        verify_tokenization(tokenizer, directory)
        lm = load_causal_lm(directory, **model_kwargs)
    lm.eval()
    model = model_class.from_base(lm, tokenizer, config, saved_tokenizer=True)
    load_head(model, directory)
    return model


def _local_folder(name_or_path, revision, cache_dir, local_files_only, token) -> Path:
    """``name_or_path`` as a local folder: itself, or the Hub repo's snapshot (downloaded, or
    from the local cache when offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise FileNotFoundError(f"{name} is neither a saved QuietStar model folder nor a Hub repo id "
                                "('owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    local_only = offline() if local_files_only is None else local_files_only
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=local_only))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{name} is not in the local Hugging Face cache"
                                f"{f' ({cache_dir})' if cache_dir else ''} and the Hub is not to be "
                                "reached (offline); download it once with network, or pass a folder") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name}: no such repo on the Hugging Face Hub (or no access: "
                                "pass token=...)") from None


# ---------------------------------------------------------------------- the head file
def head_state_dict(model, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The head file's tensors, from ``model``'s live parameters or from ``state_dict`` (its
    full state dict, e.g. gathered from FSDP / ZeRO-3 shards)."""
    source = model.state_dict() if state_dict is None else state_dict
    head = {META_VECTORS_KEY: source["embedding.scaled_vectors"]}  # the model's name for them
    return head | {k: v for k, v in source.items() if k.startswith(MIXING_HEAD_PREFIX)}


def load_head_state_dict(model, tensors: dict[str, torch.Tensor]) -> None:
    """Loads ``head_state_dict``'s tensors into ``model``; ValueError if they do not fit it."""
    tensors = dict(tensors)
    try:
        model.embedding.scaled_vectors.data.copy_(tensors.pop(META_VECTORS_KEY))
        model.mixing_head.load_state_dict({k.removeprefix(MIXING_HEAD_PREFIX): v for k, v in tensors.items()})
    except (KeyError, RuntimeError) as e:
        raise QuietStarInputError(f"the head weights do not fit this model ({str(e).strip().splitlines()[0]})") from None


def save_head(model, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes ``<directory>/quietstar_head.safetensors``."""
    path = Path(directory) / HEAD_WEIGHTS_NAME
    save_file({k: v.detach().contiguous().cpu() for k, v in head_state_dict(model, state_dict).items()}, path)
    return path


def read_head_file(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``<directory>/quietstar_head.safetensors``; FileNotFoundError if it is
    missing, ValueError if it is damaged."""
    path = Path(directory) / HEAD_WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise QuietStarInputError(f"{path} is corrupt ({e})") from None


def load_head(model, directory: str | Path) -> None:
    """Reads ``<directory>/quietstar_head.safetensors`` into ``model``."""
    try:
        tensors = read_head_file(directory)
    except ValueError as e:
        raise QuietStarInputError(f"{e}; restore it from a backup or an earlier save") from None
    try:
        load_head_state_dict(model, tensors)
    except ValueError as e:
        raise QuietStarInputError(f"{Path(directory) / HEAD_WEIGHTS_NAME} does not fit this model: {e}; it "
                                  "was saved from a different base model or is damaged") from None
