"""Files a run writes: atomic text and JSON, JSON lines, content hashes, timestamps.

A kill never leaves a half-written file: :func:`write_text_atomic` writes a temporary file and
renames it into place. :func:`read_jsonl` drops a line cut by a kill.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vlsi.errors import VlsiError


def read_json(path: Path) -> Any:
    """A JSON file's content (raises ``VlsiError`` naming the file when it does not parse)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise VlsiError(f"cannot read {path}: {err}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file (none if it does not exist); a torn last line is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of ``path`` (created with its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the records with ``step <= last_step`` (a resumed run redoes the later steps)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace``: readers never see a partial file.

    The parent directory is created; the temporary name is per process, so two processes
    writing the same file never remove each other's temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path, *, sample_bytes: int | None = None) -> str:
    """SHA-256 of a file; with ``sample_bytes``, of its size, first and last ``sample_bytes``
    only (for checkpoints of many GB, whose header already names every tensor)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if sample_bytes is None or size <= 2 * sample_bytes:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(str(size).encode())
            digest.update(f.read(sample_bytes))
            f.seek(size - sample_bytes)
            digest.update(f.read(sample_bytes))
    return digest.hexdigest()


def canonical_digest(payload: Any) -> str:
    """SHA-256 of ``payload`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
