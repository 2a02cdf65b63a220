"""benchmarks/gpu_check.py: its ``--smoke`` run (every part on tiny shapes on the CPU) passes
every check, and a part killed at its time cap is recorded as such, with what it had measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_smoke_run_passes_every_check(tmp_path):
    out = tmp_path / "out"
    proc = _run("--smoke", "--out", str(out), "--work", str(tmp_path / "work"), timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["parts"]) == ["a", "b", "c", "d", "e"]
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), proc.stdout[-3000:])
        assert part["checks"] and all(c["status"] == "ok" for c in part["checks"].values()), name
    criteria = {(p, check, name): c for p, part in report["parts"].items()
                for check, entry in part["checks"].items() for name, c in entry["criteria"].items()}
    assert {p for p, _, _ in criteria} == set("abcde")  # every part judged something
    failed = {key: c for key, c in criteria.items() if not c["passed"]}
    assert not failed, failed
    assert proc.returncode == 0, proc.stdout[-3000:]
    # the figures are this run's: the chunked loss against the naive one, measured here
    dense = report["parts"]["a"]["checks"]["dense forward KL"]["figures"]
    assert dense["chunked_loss"] == pytest.approx(dense["reference_loss"], rel=1e-5)
    assert (out / "gpu_check.md").read_text().startswith("# GPU check")


@pytest.mark.slow
def test_a_part_past_its_cap_is_killed_with_its_launches_and_recorded(tmp_path):
    """Part (d) needs about a minute here. At a 12 s cap it is cut in its setup or inside a launch:
    each of its three launches runs at least 5 s, so the part cannot end inside the cap."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run("--smoke", "--parts", "d", "--cap", "d=12", "--out", str(out), "--work", str(work), timeout=120)
    assert proc.returncode == 1
    part = json.loads((out / "gpu_check.json").read_text())["parts"]["d"]
    assert part["status"] == "timeout" and part["seconds"] < 27
    assert part["checks"]["environment"]["status"] == "ok"  # measured before the cap: kept
    assert "| d | tiny vlsi distill / interact under accelerate launch (plain, FSDP, ZeRO-3) | timeout |" in (
        out / "gpu_check.md").read_text()
    for pgid in json.loads((work / "part_d.json").read_text())["child_pgids"]:  # launches under way: ended
        assert _group_ends(pgid, within_s=10), pgid


def _group_ends(pgid: int, within_s: float) -> bool:
    """Whether process group ``pgid`` is gone (its killed members reaped) within ``within_s``."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
