"""The one place distill decides whether it may download, and turns a model name into a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from distill.errors import DistillError

_TRUE = ("1", "true", "yes", "on")
# what a pipeline folder needs: configs, safetensors weights, tokenizer files (vocab/merges, sentencepiece)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def hub_offline() -> bool:
    """True when downloads are forbidden: ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) is set."""
    return any(os.environ.get(k, "0").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local folder for ``name_or_path``: the folder itself, or a hub snapshot when online.

    Raises a one-sentence :class:`DistillError` for a missing folder, or a hub id while offline.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DistillError(f"{path} is a file; give the model's folder (a diffusers pipeline folder).")
        return path
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise DistillError(f"model folder {name} does not exist; give a diffusers pipeline folder or a hub id.")
    if hub_offline():
        raise DistillError(
            f"{name} is not a local folder and the Hugging Face hub is offline (HF_HUB_OFFLINE=1); "
            "download it on a connected machine with `huggingface-cli download "
            f"{name} --local-dir DIR` and pass DIR instead."
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # any hub failure is one sentence for the user
        raise DistillError(
            f"could not download {name} from the Hugging Face hub ({type(exc).__name__}); check the id and the "
            "network, or download it elsewhere and pass the local folder."
        ) from exc
