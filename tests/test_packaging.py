"""The shipped demo pairs and the page templates are package data: every one of their files
matches a pattern in pyproject.toml, so a wheel (not only an editable install) carries them."""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath

import pytest

from vlsi.demo.pair import SHIPPED_DIRS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("regime", sorted(SHIPPED_DIRS))
def test_every_file_of_the_shipped_pair_is_package_data(regime):
    shipped = SHIPPED_DIRS[regime]
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vlsi.demo"]
    files = [PurePosixPath(p.relative_to(shipped.parent).as_posix())
             for p in shipped.rglob("*") if p.is_file()]
    assert any("snapshots" in str(f) for f in files)
    missing = [str(f) for f in files if not any(f.match(pattern) and len(f.parts) == len(PurePosixPath(pattern).parts)
                                                for pattern in patterns)]
    assert missing == []


@pytest.mark.parametrize("package,pages", [("tools", {"page.html.j2", "macros.html.j2", "layer_view.html.j2"}),
                                           ("demo", {"report.html.j2", "ablation.html.j2"})])
def test_the_page_templates_are_package_data(package, pages):
    templates = ROOT / "src" / "vlsi" / package / "templates"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [PurePosixPath(p.relative_to(templates.parent).as_posix())
             for p in templates.rglob("*") if p.is_file()]
    assert {f.name for f in files} >= pages
    patterns = package_data[f"vlsi.{package}"]
    assert [str(f) for f in files if not any(f.match(pattern) for pattern in patterns)] == []
