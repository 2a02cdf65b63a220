"""Fixtures for the data-pipeline tests: a folder of small images and a JSONL writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest


@pytest.fixture
def image_dir(tmp_path, write_image) -> Path:
    """``red.png`` 60x40, ``blue.png`` 90x120, ``green.png`` 56x56, plus two broken files:
    ``corrupt.png`` (not an image) and ``truncated.png`` (valid header, data cut short)."""
    write_image(tmp_path / "red.png", (60, 40), (220, 20, 20))
    write_image(tmp_path / "blue.png", (90, 120), (20, 20, 220))
    write_image(tmp_path / "green.png", (56, 56), (20, 200, 20))
    (tmp_path / "corrupt.png").write_bytes(b"this is not an image")
    big = write_image(tmp_path / "big.png", (200, 200), (1, 2, 3))
    data = big.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    big.unlink()
    return tmp_path


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[[Path, list[Any]], Path]:
    """``write_jsonl(path, records)``: one line per record; a ``str`` record is written raw."""

    def write(path: Path, records: list[Any]) -> Path:
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


def llava(sample_id: str | None, question: str, answer: str, image: Any = None) -> dict[str, Any]:
    """A one-exchange LLaVA-style record."""
    record: dict[str, Any] = {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    }
    if sample_id is not None:
        record["id"] = sample_id
    if image is not None:
        record["image"] = image
    return record


@pytest.fixture(scope="session")
def llava_record() -> Callable[..., dict[str, Any]]:
    """``llava_record(id, question, answer, image=None)`` -> a LLaVA-style record."""
    return llava
