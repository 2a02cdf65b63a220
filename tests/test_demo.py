"""``vlsi demo --quick`` end to end, its report, resume, and the command line's error handling."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from vlsi.cli import main
from vlsi.demo.pipeline import ROWS


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_demo_writes_the_report(quick_demo):
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    assert list(metrics["rows"]) == [k for k, _ in ROWS]
    num_eval = metrics["setup"]["num_eval"]
    for key, row in metrics["rows"].items():
        assert 0.0 <= row["mean"] <= 1.0 and row["count"] == num_eval, key
        predictions = (quick_demo / "seed-0" / "eval" / f"{key}.jsonl").read_text().splitlines()
        assert len(predictions) == num_eval
        hits = sum(json.loads(line)["correct"] for line in predictions)
        assert row["per_seed"] == [hits / num_eval]  # the table is the predictions' tally
    assert metrics["num_seeds"] == 1
    md = (quick_demo / "report.md").read_text()
    for _, label in ROWS:
        assert label in md
    assert "no spread across seeds was measured" in md  # one seed: the claim is not made
    assert "paper Fig. 5" in md and "appendix B" in md and "paper Fig. 3" in md


def test_quick_demo_stage_outputs(quick_demo):
    seed = quick_demo / "seed-0"
    for path in ("teacher/model/config.json", "student/model/config.json", "vlsi/4-sft/model/config.json",
                 "vlsi-no-sft/config.json", "sft-only/model/config.json",
                 "vlsi/3-interact/heatmap_start.png", "vlsi/1-teacher-verbalize/layer_loss.json"):
        assert (seed / path).is_file(), path
    result = json.loads((seed / "seed.json").read_text())
    # SFT-only gets as many optimizer steps as interaction + SFT together
    steps = result["steps"]
    assert steps["sft_only"] == steps["interact"] + steps["sft"]
    done = json.loads((seed / "sft-only" / "step_complete.json").read_text())
    assert done["global_step"] == steps["sft_only"]
    panel = json.loads((seed / "panel.json").read_text())
    assert panel and [c["name"] for c in panel[0]["columns"]] == ["Student before", "VLsI", "Teacher"]


def test_report_html_is_self_contained(quick_demo):
    page = (quick_demo / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:)', page)
    assert page.count('src="data:image/png;base64,') >= 3  # two heatmaps, panel images
    assert "<svg" in page and "<table>" in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine")
def test_report_renders_in_headless_chromium(quick_demo, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,2000",
                    (quick_demo / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    assert shot.is_file() and shot.stat().st_size > 10_000
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (quick_demo / "report.html").as_uri()], check=True, timeout=120,
                         capture_output=True, text=True).stdout
    assert "VLsI demo report" in dom and "Student, SFT only" in dom


def test_rerun_reuses_finished_seed(quick_demo, capsys):
    before = (quick_demo / "metrics.json").read_text()
    assert main(["demo", "--quick", "--out", str(quick_demo)]) == 0
    assert "done earlier" in capsys.readouterr().out
    after = json.loads((quick_demo / "metrics.json").read_text())
    assert after["rows"] == json.loads(before)["rows"]


def test_other_recipe_in_same_out_is_refused(quick_demo, capsys):
    assert main(["demo", "--out", str(quick_demo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "different recipe" in err and err.count("\n") == 1


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "missing.json"), "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["demo", "--seeds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


def test_tiny_command_builds_a_pair(tmp_path, capsys):
    assert main(["tiny", str(tmp_path), "--family", "qwen3_vl"]) == 0
    assert (tmp_path / "teacher" / "config.json").is_file()
    assert (tmp_path / "student" / "model.safetensors").is_file()
