"""Fixtures shared by the whole test suite: tiny checkpoints and images, synthetic data, the tiny
run config pointed at them, ``vlsi`` in a subprocess and in-process, and the shared runs.

Shared runs: ``distilled`` (one uninterrupted ``vlsi distill`` on the tiny pair) and ``resumed``
(the same run killed at three points and rerun to its end) are made once per session; the tests
that only read their outputs read them, the tests that change them work on a copy
(``distilled.copy(path)``).

Tiers: tests marked ``slow`` run only in ``make test-slow`` and ``make test-all``
(docs/testing.md). Under ``VLSI_NO_SKIP=1`` (CI, .ci/run) a skipped test fails the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from helpers import DISTILL_SETTINGS, MISSING_IMAGE, REPO, RESUME_KILL_POINTS, TINY_CONFIG, set_args as _set_args
from vlsi.data.synthetic import SyntheticConfig, generate_dataset
from vlsi.models.tiny import TinyPair, save_tiny_pair
from vlsi.train.config import RunConfig, load_config


def pytest_sessionfinish(session, exitstatus):
    """``VLSI_NO_SKIP=1``: a run that passed but skipped a test fails (CI runs every test)."""
    if os.environ.get("VLSI_NO_SKIP") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [r for r in (reporter.stats.get("skipped", []) if reporter else []) if not hasattr(r, "wasxfail")]
    if skipped:
        reporter.write_line(f"\nVLSI_NO_SKIP=1 and {len(skipped)} test(s) skipped: "
                            + "; ".join(f"{r.nodeid} ({r.longrepr[2] if isinstance(r.longrepr, tuple) else r.longrepr})"
                                        for r in skipped), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> Callable[[str], TinyPair]:
    """``tiny_pair(family)`` -> :class:`~vlsi.models.tiny.TinyPair`, saved once per family per session."""
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


# -- synthetic data and the tiny run config ----------------------------------------------------


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """16 training and 4 evaluation samples of the synthetic dataset (56-px images)."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, SyntheticConfig(seed=0, num_train=16, num_eval=4), overwrite=True)
    return out


@pytest.fixture(scope="session")
def tiny_overrides(tiny_pair, synth_dir) -> Callable[..., dict[str, Any]]:
    """``tiny_overrides(output_dir, **more)``: ``--set`` keys that point ``configs/tiny-qwen2vl.yaml``
    at the session's tiny Qwen2-VL pair, the synthetic data and ``output_dir``."""
    pair = tiny_pair("qwen2_vl")

    def make(output_dir: Path, **more: Any) -> dict[str, Any]:
        return {
            "teacher": str(pair.teacher),
            "student": str(pair.student),
            "output_dir": str(output_dir),
            "data.train": [str(synth_dir / "train.json")],
            "data.image_root": str(synth_dir),
            "training.logging_steps": 1,
            **more,
        }

    return make


@pytest.fixture(scope="session")
def tiny_config(tiny_overrides) -> Callable[..., RunConfig]:
    """``tiny_config(output_dir, **more)``: the shipped tiny config loaded with those overrides."""

    def make(output_dir: Path, **more: Any) -> RunConfig:
        return load_config(TINY_CONFIG, tiny_overrides(output_dir, **more))

    return make


@pytest.fixture(scope="session")
def set_args() -> Callable[[dict[str, Any]], list[str]]:
    """``set_args({"a.b": 1})`` -> ``["--set", "a.b=1"]`` (JSON values are valid YAML)."""
    return _set_args


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for subprocesses: one torch thread, offline, and this checkout's ``src`` first
    on the path (whichever checkout the virtualenv's editable install points at)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p))
    return env


@pytest.fixture(scope="session")
def run_cli(cli_env) -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args, timeout=..., env={...})``: ``python -m vlsi.cli ARGS`` in a subprocess,
    output captured; ``env`` adds variables (e.g. ``VLSI_KILL_AT``) to :func:`cli_env`."""

    def run(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vlsi.cli", *args], cwd=REPO, env={**cli_env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    return run


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys) -> Callable[..., CliResult]:
    """``cli(*args)``: ``vlsi ARGS`` in this process (:func:`vlsi.cli.main`), its exit code and
    output. For commands that stop before training (errors, refusals, finished steps skipped):
    no interpreter to start, torch and transformers already imported."""
    from vlsi.cli import main

    def run(*args: Any) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


# -- the shared runs ---------------------------------------------------------------------------

@dataclass
class DistillRun:
    """A finished ``vlsi distill`` run directory and how it was made."""

    out: Path
    overrides: dict[str, Any]  # the --set keys (``output_dir`` included)
    stdout: str  # of the run that made it

    @property
    def data(self) -> Path:
        return Path(self.overrides["data.train"][0])

    def settings(self, out: Path | None = None, **more: Any) -> list[str]:
        """``--set`` arguments of this run, for output directory ``out`` (default: its own)."""
        return _set_args({**self.overrides, "output_dir": str(out or self.out), **more})

    def copy(self, out: Path) -> "DistillRun":
        """A copy of the run of its own at ``out`` (fingerprints hold no output path)."""
        shutil.copytree(self.out, out)
        return DistillRun(out, {**self.overrides, "output_dir": str(out)}, self.stdout)


@pytest.fixture(scope="session")
def distill_data(tmp_path_factory, synth_dir) -> Path:
    """The synthetic training records, the third naming a missing image."""
    records = json.loads((synth_dir / "train.json").read_text())
    records[2]["image"] = MISSING_IMAGE
    path = tmp_path_factory.mktemp("distill_data") / "train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def distilled(tmp_path_factory, tiny_overrides, distill_data, run_cli) -> DistillRun:
    """One uninterrupted ``vlsi distill`` of the tiny pair (:data:`DISTILL_SETTINGS`, one record
    skipped). Read it; change only a ``copy``."""
    out = tmp_path_factory.mktemp("distilled") / "run"
    overrides = tiny_overrides(out, **DISTILL_SETTINGS, **{"data.train": [str(distill_data)]})
    done = run_cli("distill", str(TINY_CONFIG), *_set_args(overrides))
    assert done.returncode == 0, done.stderr[-3000:]
    return DistillRun(out, overrides, done.stdout)


@pytest.fixture(scope="session")
def resumed(tmp_path_factory, distilled, run_cli) -> DistillRun:
    """:func:`distilled`'s run killed (SIGKILL) at each of :data:`RESUME_KILL_POINTS` in turn,
    then rerun to its end; ``stdout`` is the last rerun's."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    settings = distilled.settings(out)
    for point in RESUME_KILL_POINTS:
        proc = run_cli("distill", str(TINY_CONFIG), *settings, env={"VLSI_KILL_AT": point})
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.stderr[-2000:]}"
    final = run_cli("distill", str(TINY_CONFIG), *settings)
    assert final.returncode == 0, final.stderr[-3000:]
    return DistillRun(out, {**distilled.overrides, "output_dir": str(out)}, final.stdout)
