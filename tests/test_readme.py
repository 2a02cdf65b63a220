"""The README as written: every relative link in README.md and docs/*.md points to a file that
exists (and to a heading of it where the link names one, GitHub's anchors), and every ``vlsi``
command in the README's shell blocks is one the command line accepts, naming files that exist.

The README's Python block runs in tests/test_examples.py; its CPU shell block (the five steps on
the tiny pair) runs as written in the slow tier (:func:`test_readme_cpu_block_runs_as_written`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from vlsi.cli import build_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but ``-`` and ``_`` dropped,
    each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
        seen[base] = n + 1
    return out


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return [a or b for a, b in LINK.findall(text)]


def test_slug_is_githubs():
    assert slug("The offline teacher cache (`vlsi cache-teacher`, `benchmarks/teacher_cache.py`)") \
        == "the-offline-teacher-cache-vlsi-cache-teacher-benchmarksteacher_cachepy"
    assert slug("(d) Operations for intermediate / last layers") == "d-operations-for-intermediate--last-layers"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def readme_commands() -> list[list[str]]:
    """The ``vlsi`` invocations of the README's bash blocks (continuations joined, comments and
    ``&&`` chains split), as argument lists after ``vlsi``; ``-m vlsi.cli`` under
    ``accelerate launch`` counts as ``vlsi``."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["vlsi"]:
                    out.append(words[1:])
                elif "vlsi.cli" in words:
                    out.append(words[words.index("vlsi.cli") + 1:])
    return out


def test_readme_vlsi_commands_parse_and_name_existing_repo_files():
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"data", "plan", "distill", "eval", "generate", "tiny"}
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # exits (SystemExit) on an unknown option or a missing argument
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S))
    named = re.findall(r"(?<![\w/])((?:accelerate_configs|configs|examples)/[\w./-]+)", blocks)
    assert named
    assert not [path for path in named if not (REPO / path).exists()]


def cpu_block() -> str:
    """The README's shell block of the five steps on a CPU."""
    section = (REPO / "README.md").read_text().split("The same five steps on a CPU", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_cpu_block_runs_as_written(tmp_path):
    for name in ("configs", "examples"):  # what the block names, from a fresh working directory
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-e", "-c", cpu_block()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    model = tmp_path / "runs" / "tiny-qwen2vl" / "4-sft" / "model"
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    assert re.search(r"^accuracy \d\.\d{4} \(", done.stdout, re.M)  # vlsi eval's summary line
