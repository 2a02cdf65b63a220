"""Fixtures for the stage tests: synthetic data, the tiny run config pointed at tmp paths, and a
runner for ``python -m vlsi.cli`` in a subprocess (one torch thread: the machines are shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from vlsi.config import RunConfig, load_config
from vlsi.data.synthetic import SyntheticConfig, generate_dataset

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny-qwen2vl.yaml"


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


def _set_args(overrides: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


@pytest.fixture(scope="session")
def set_args() -> Callable[[dict[str, Any]], list[str]]:
    """``set_args({"a.b": 1})`` -> ``["--set", "a.b=1"]`` (JSON values are valid YAML)."""
    return _set_args


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for subprocesses: one torch thread, offline."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def run_cli(cli_env) -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args, timeout=...)``: ``python -m vlsi.cli ARGS`` in a subprocess, output captured."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vlsi.cli", *args], cwd=REPO, env=cli_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
