"""Where mlarch keeps what it can rebuild: converted models, downloaded data (named corpora and
hub data sets), weight digests.

One variable governs all of it: $MLARCH_CACHE, else the platform's user cache folder for
mlarch (~/.cache/mlarch on Linux). Torch-free, so the CLI can name paths without loading it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$MLARCH_CACHE, else the platform's user cache folder for mlarch. A path that is a
    file, or lies under one, is an error naming the variable (a download or a model
    conversion would blame the network or the archive)."""
    chosen = os.environ.get("MLARCH_CACHE")
    if chosen:
        path = Path(chosen).expanduser()
    else:
        import pooch

        path = Path(pooch.os_cache("mlarch"))
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        from mlarch.errors import MlarchError

        where = f"$MLARCH_CACHE ({path})" if chosen else f"the cache folder {path}"
        raise MlarchError(f"{where} cannot be a folder: {existing} is "
                          f"{'a broken or looping link' if existing.is_symlink() else 'a file'}; set MLARCH_CACHE "
                          "to a folder mlarch may write")
    return path


def models_dir() -> Path:
    """Converted transformers folders of the named models (see mlarch.ingest.named_models)."""
    return cache_dir() / "models"


def data_dir() -> Path:
    """Downloaded data files of the named sources (mlarch.ingest.corpora)."""
    return cache_dir() / "data"


def hub_data_dir() -> Path:
    """Hugging Face Hub data sets (hf:OWNER/NAME sources), in huggingface_hub's cache layout
    (datasets--OWNER--NAME/snapshots/COMMIT/...), apart from the user's own HF cache: one
    variable ($MLARCH_CACHE) moves or clears everything mlarch downloaded."""
    return data_dir() / "hub"


def digests_file() -> Path:
    """sha256 of weight files, remembered by (path, size, mtime, inode)."""
    return cache_dir() / "weight-digests.json"
