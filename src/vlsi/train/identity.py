"""Identities of a run's inputs: files, models and data by content (read by :mod:`vlsi.train.fingerprint`).

A file's identity is its SHA-256; files over :data:`WHOLE_FILE_LIMIT` are sampled (size, first
and last :data:`SAMPLE_BYTES`: a safetensors header already names every tensor), so a 144 GB
teacher is not read whole. Digests are memoised per process by (path, size, mtime).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from vlsi.files import sha256_file
from vlsi.train.config import DataConfig

SAMPLE_BYTES = 8 << 20
WHOLE_FILE_LIMIT = 128 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HASHES: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file (sampled above :data:`WHOLE_FILE_LIMIT`), memoised per process by
    (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        sample = SAMPLE_BYTES if st.st_size > WHOLE_FILE_LIMIT else None
        _HASHES[key] = sha256_file(path, sample_bytes=sample)
    return _HASHES[key]


def model_identity(path: str | Path) -> dict[str, Any]:
    root = Path(path).resolve()
    weights = sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"))
    return {"path": str(root), "config": file_digest(root / "config.json"),
            "weights": {p.name: file_digest(p) for p in weights}}


def identity_of_teacher(teacher: str | Path, cache: Path | None) -> dict[str, Any]:
    """The teacher's :func:`model_identity`. A teacher directory without weight files (a machine
    the teacher does not fit) takes the weights that the complete teacher ``cache`` the run reads
    (``interaction.teacher_cache``) recorded; path and ``config.json`` stay its own, so the cache
    of another teacher is still refused."""
    from vlsi.train.teacher_cache import cache_complete, read_manifest

    identity = model_identity(Path(teacher).expanduser())
    if not identity["weights"] and cache is not None and cache_complete(cache):
        identity["weights"] = read_manifest(cache)["teacher"].get("weights", {})
    return identity


def identity_of_data(data: DataConfig) -> dict[str, Any]:
    """The data settings (but the file lists) and the SHA-256 of every training file by path."""
    settings = dataclasses.asdict(data)
    files = {str(Path(f).resolve()): file_digest(Path(f)) for f in data.train}
    return {**{k: v for k, v in settings.items() if k not in ("train", "eval")}, "train": files}


_PREPROCESSING_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                        "preprocessor_config.json")


def preprocessing_digest(model_dir: str | Path) -> str:
    """sha256 over the model's tokenizer, chat template and image-processor files."""
    digest = hashlib.sha256()
    for name in _PREPROCESSING_FILES:
        f = Path(model_dir) / name
        if f.is_file():
            digest.update(name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()
