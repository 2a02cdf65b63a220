"""Fixtures shared by the whole test suite: tiny checkpoints and tiny images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from vlsi.tiny import TinyPair, save_tiny_pair


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> Callable[[str], TinyPair]:
    """``tiny_pair(family)`` -> :class:`~vlsi.tiny.TinyPair`, saved once per family per session."""
    root = tmp_path_factory.mktemp("tiny_pairs")
    built: dict[str, TinyPair] = {}

    def get(family: str = "qwen2_vl") -> TinyPair:
        if family not in built:
            built[family] = save_tiny_pair(root / family, family)
        return built[family]

    return get


def _write_image(path: str | Path, size: tuple[int, int] = (56, 56),
                 color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture(scope="session")
def write_image() -> Callable[..., Path]:
    """``write_image(path, size=(w, h), color=(r, g, b))`` saves a solid-colour image, returns path."""
    return _write_image
