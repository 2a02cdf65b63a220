"""``vlsi demo --quick`` end to end on the shipped pair, its report (in a real browser where one
is installed), resume, the verdict rule, the pair's rebuild, and the command line's error
handling. The pair's rebuild and the teacher map run only in ``make test-all`` (``slow``)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from dataclasses import replace

import pytest

from vlsi.cli import main
from vlsi.demo.run import run_demo, run_pretrain
from vlsi.demo.pair import (compare_pairs, install_pair, load_pair, load_teacher_source, model_files,
                            shipped_pair)
from vlsi.demo.pipeline import ROWS, SEED_ROWS
from vlsi.demo.recipe import DEFAULT_REGIME, REGIMES

DEFAULT = REGIMES[DEFAULT_REGIME]()  # what `vlsi demo` runs
from vlsi.errors import VlsiError


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_each_shipped_pair_matches_its_regimes_recipe(regime):
    pair = load_pair(shipped_pair(regime), REGIMES[regime]())  # raises if the recipe changed without a rebuild
    assert pair.shipped and pair.teacher.is_dir() and pair.student.is_dir()
    curves = pair.meta["curves"]
    assert set(curves) == {"teacher", "student"} and all(len(c) >= 5 for c in curves.values())


def test_quick_demo_writes_the_report(quick_demo):
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    assert list(metrics["rows"]) == [k for k, _ in ROWS]
    num_eval = metrics["setup"]["num_eval"]
    assert metrics["num_seeds"] == 2
    for key, _ in SEED_ROWS:
        row = metrics["rows"][key]
        assert row["count"] == num_eval, key
        tallies = []
        for seed in (0, 1):
            lines = (quick_demo / f"seed-{seed}" / "eval" / f"{key}.jsonl").read_text().splitlines()
            assert len(lines) == num_eval
            tallies.append(sum(json.loads(line)["correct"] for line in lines) / num_eval)
        assert row["per_seed"] == tallies  # the table is the predictions' tally
    assert metrics["rows"]["vlsi_no_sft_beam"]["num_beams"] == DEFAULT.num_beams
    p = metrics["paired"]["sft_only"]
    assert p["per_seed"] == [a - b for a, b in zip(metrics["rows"]["vlsi"]["per_seed"],
                                                   metrics["rows"]["sft_only"]["per_seed"])]
    assert metrics["setup"]["regime_name"] == DEFAULT_REGIME
    regime = metrics["regime"]
    assert regime["samples"] == DEFAULT.quick().regime_samples
    assert regime["student_target_layers"] == DEFAULT.student.num_layers - 1
    assert regime["teacher_target_layers"] == len(regime["verbalized"]) == DEFAULT.teacher.num_layers - 1
    assert regime["mean_response_tokens"] >= 1
    triples = [(regime["teacher_entropy_nats"], regime["teacher_label_kl_nats"], regime["teacher_label_probability"])]
    triples += [(v["entropy_nats"], v["label_kl_nats"], v["label_probability"]) for v in regime["verbalized"]]
    for entropy, label_kl, probability in triples:
        assert entropy >= 0 and label_kl >= 0 and 0 < probability <= 1
        assert math.exp(-label_kl) <= probability + 1e-9  # Jensen: mean P(y) >= exp(mean log P(y))
    assert regime["teacher_verbalizers"].endswith("1-teacher-verbalize")
    md = (quick_demo / "report.md").read_text()
    assert "Information in the targets" in md and f"t_s = {DEFAULT.student.num_layers - 1}" in md
    for _, label in ROWS:
        assert label in md
    for needle in ("VLsI minus SFT-only", "VLsI minus last-layer KD", "paper Fig. 5", "appendix B",
                   "paper Fig. 3", "Matching entropy", "command | vlsi demo --quick --seeds 2",
                   "commit ", "r=16, alpha=32", "matching vlsi, temperature rule paper",
                   "lr 0.002", "Resolved config", "shipped with the package", "Wall time"):
        assert needle in md, needle
    # the wall times come before the results
    assert md.index("Wall time") < md.index("## Results")


def test_quick_demo_stage_outputs(quick_demo):
    seed = quick_demo / "seed-0"
    for path in ("vlsi/4-sft/model/config.json", "vlsi-no-sft/config.json", "sft-only/model/config.json",
                 "llkd/4-sft/model/config.json", "vlsi/3-interact/heatmap_start.png",
                 "on-policy/4-sft/model/config.json", "on-policy/3-interact/generations.jsonl",
                 "vlsi/1-teacher-verbalize/layer_loss.json"):
        assert (seed / path).is_file(), path
    result = json.loads((seed / "seed.json").read_text())
    steps = result["steps"]  # equal compute: SFT-only gets interaction + SFT steps
    assert steps["sft_only"] == steps["interact"] + steps["sft"]
    for part, expected in (("sft-only", steps["sft_only"]), ("llkd/3-interact", steps["interact"]),
                           ("llkd/4-sft", steps["sft"]), ("vlsi/3-interact", steps["interact"]),
                           ("on-policy/3-interact", steps["interact"]), ("on-policy/4-sft", steps["sft"])):
        done = json.loads((seed / part / "step_complete.json").read_text())
        assert done["global_step"] == expected, part
    # last-layer KD matched no intermediate pair: its heatmap is empty
    llkd = json.loads((seed / "llkd" / "3-interact" / "heatmap_end.json").read_text())
    assert not any(any(row) for row in llkd["counts"])
    # the on-policy row generated about half of its micro-batches, and the report shows some
    logged = [json.loads(line) for line in (seed / "on-policy" / "3-interact" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["on_policy/share"] for r in logged if "on_policy/share" in r]
    assert shares and 0 < sum(shares) / len(shares) < 1
    assert result["generations"] and result["generations"][0] == json.loads(
        (seed / "on-policy" / "3-interact" / "generations.jsonl").read_text().splitlines()[0])
    report = (quick_demo / "report.md").read_text()
    section = report[report.index("## On-policy responses"):].split("\n## ")[0]
    assert f"| {result['generations'][0]['step']} | {result['generations'][0]['text']} |" in section
    assert result["matching_entropy"] and all(e >= 0 for pts in result["matching_entropy"].values()
                                              for _, e in pts)
    panel = json.loads((seed / "panel.json").read_text())
    assert panel and [c["name"] for c in panel[0]["columns"]] == ["Student before", "VLsI", "Teacher"]


def test_report_html_is_self_contained(quick_demo):
    page = (quick_demo / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing from elsewhere: a source is a data URI, a link a fragment of this page (the SVG
    # charts' <use xlink:href="#id">)
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:|#)', page)
    assert page.count('src="data:image/png;base64,') >= 3  # two heatmaps, panel images
    assert page.count("<svg") >= 2 and "optimizer step" in page and "held-out accuracy" in page


def _chromium() -> str | None:
    """A Chromium on the PATH: ``chromium`` is Debian's package (what .ci/run installs),
    ``chromium-browser`` Ubuntu's, ``google-chrome`` Google's, ``headless_shell`` the bare one."""
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Console messages go to stderr; every host name fails to resolve, so a fetch from elsewhere
# fails and is logged as a console error ("Failed to load resource: net::ERR_...").
_BROWSER = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--host-resolver-rules=MAP * ~NOTFOUND"]


def _browse(page, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), *_BROWSER, *args, page.as_uri()], check=True, timeout=120,
                          capture_output=True, text=True)


def _console_errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Failed to load resource" in line]


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt-get install chromium; "
                                                ".ci/run installs it, so CI runs this test)")
def test_report_renders_in_headless_chromium(quick_demo, tmp_path):
    """The report in a real browser: laid out (a full, non-blank page), its charts and images
    present in the rendered page, nothing fetched from elsewhere, no console error."""
    from PIL import Image

    # the detector itself: a page with a console error and an external image is caught
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><img src="http://example.invalid/a.png">'
                       '<script>console.error("control error")</script></body></html>')
    assert _console_errors(_browse(control, "--dump-dom"))

    page = quick_demo / "report.html"
    shot = tmp_path / "report.png"
    rendered = _browse(page, f"--screenshot={shot}", "--window-size=1200,2000")
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 100, "a blank or nearly blank page"
    dom = _browse(page, "--dump-dom").stdout
    assert "VLsI demo report" in dom and "Student, SFT only" in dom
    assert dom.count("<svg") >= 2 and "optimizer step" in dom and "held-out accuracy" in dom  # the charts
    assert dom.count('src="data:image/png;base64,') >= 3  # two heatmaps, panel images
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:|#)', dom)  # no external asset in the rendered page
    assert _console_errors(rendered) == []


def test_rerun_reuses_finished_seeds(quick_demo, capfd):
    before = json.loads((quick_demo / "metrics.json").read_text())
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(quick_demo)]) == 0
    assert capfd.readouterr().out.count("done earlier") == 2  # printed by the worker processes
    after = json.loads((quick_demo / "metrics.json").read_text())
    assert after["rows"] == before["rows"]


def test_other_recipe_in_same_out_is_refused(quick_demo, capsys):
    assert main(["demo", "--out", str(quick_demo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "different recipe" in err and err.count("\n") == 1


@pytest.mark.slow
def test_pair_rebuild_is_bit_exact_and_checked(tmp_path, capsys):
    assert run_pretrain(tmp_path / "a", quick=True) == 0
    assert run_pretrain(tmp_path / "b", quick=True) == 0
    quick = DEFAULT.quick_pretraining()
    a, b = load_pair(tmp_path / "a", quick), load_pair(tmp_path / "b", quick)
    assert compare_pairs(a, b) == []
    assert set(a.meta["files"]["teacher"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    install_pair(a, tmp_path / "installed")  # how the shipped pair is made: models, snapshots, pair.json
    installed = load_pair(tmp_path / "installed", quick)
    assert model_files(installed.teacher) == a.meta["files"]["teacher"]
    assert model_files(installed.student) == a.meta["files"]["student"]
    assert model_files(installed.snapshot(6)) == model_files(a.snapshot(6))
    with pytest.raises(VlsiError, match="another pretraining recipe"):
        load_pair(tmp_path / "a", DEFAULT)
    # another student for the same teacher: the teacher is reused, not retrained
    other = replace(quick, student=replace(quick.student, num_layers=quick.student.num_layers + 1))
    assert main(["demo", "pretrain", "--quick", "--out", str(tmp_path / "c"),
                 "--teacher-from", str(tmp_path / "a")]) == 0
    assert compare_pairs(load_pair(tmp_path / "c", quick), a) == []  # same recipe: same files
    assert run_pretrain(tmp_path / "d", recipe=other, teacher_from=tmp_path / "a") == 0
    d = load_pair(tmp_path / "d", other)
    assert d.meta["files"]["teacher"] == a.meta["files"]["teacher"]
    assert model_files(d.snapshot(6)) == model_files(a.snapshot(6))
    assert d.meta["curves"]["teacher"] == a.meta["curves"]["teacher"]
    assert d.meta["files"]["student"]["model.safetensors"] != a.meta["files"]["student"]["model.safetensors"]
    longer = replace(other, teacher_pretrain=replace(other.teacher_pretrain, steps=13))
    with pytest.raises(VlsiError, match="teacher_pretrain differ"):
        run_pretrain(tmp_path / "e", recipe=longer, teacher_from=tmp_path / "a")
    # a pair whose data differs from the demo's data is refused before any training
    (tmp_path / "a" / "data" / "train.json").write_text("[]")
    with pytest.raises(VlsiError, match="differs from the data"):
        run_demo(tmp_path / "a", quick=True, seeds=1, recipe=quick, pair_dir=tmp_path / "b")


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "missing.json"), "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["demo", "--seeds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "argument --seeds: must be at least 1, got 0" in capsys.readouterr().err
    assert main(["demo", "--pair", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert "holds no pretrained pair" in capsys.readouterr().err


def test_teacher_source_is_a_pair_or_the_shipped_one(tmp_path, capsys):
    assert load_teacher_source("shipped").root == shipped_pair()
    assert main(["demo", "pretrain", "--out", str(tmp_path / "p"), "--teacher-from", str(tmp_path)]) == 2
    assert "holds no pretrained pair" in capsys.readouterr().err
    assert main(["demo", "--teacher-from", "shipped", "--out", str(tmp_path / "d")]) == 2
    assert "--teacher-from is for `vlsi demo pretrain`" in capsys.readouterr().err


def test_tiny_command_builds_a_pair(tmp_path, capsys):
    assert main(["tiny", str(tmp_path), "--family", "qwen3_vl"]) == 0
    assert (tmp_path / "teacher" / "config.json").is_file()
    assert (tmp_path / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_teacher_map_distils_from_every_snapshot(quick_demo):
    before = json.loads((quick_demo / "metrics.json").read_text())
    assert main(["demo", "--quick", "--seeds", "2", "--teacher-map", "--out", str(quick_demo)]) == 0
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    assert metrics["rows"] == before["rows"]  # the seeds are reused, not retrained
    steps = sorted(int(k) for k in shipped_pair_meta()["teacher_snapshots"])
    points = metrics["teacher_map"]
    assert [p["teacher_step"] for p in points] == [*steps, "final"]
    sft = metrics["rows"]["sft_only"]["per_seed"]
    for point, step in zip(points, steps):
        vlsi = [json.loads((quick_demo / "map" / f"teacher-step-{step}" / f"seed-{s}" / "seed.json")
                           .read_text())["vlsi"]["accuracy"] for s in (0, 1)]
        assert point["per_seed"] == [a - b for a, b in zip(vlsi, sft)]
    assert "Teacher strength map" in (quick_demo / "report.md").read_text()


def shipped_pair_meta():
    return load_pair(shipped_pair(), DEFAULT).meta


def test_rebuild_command_names_the_regime() -> None:
    from vlsi.demo.pair import rebuild_command
    from vlsi.demo.recipe import DemoRecipe, lists_recipe

    assert rebuild_command(lists_recipe()) == "vlsi demo pretrain --regime lists --out DIR"
    assert rebuild_command(DemoRecipe().quick()) == "vlsi demo pretrain --regime counts --out DIR"
    assert rebuild_command(DemoRecipe().quick_pretraining()) == "vlsi demo pretrain --regime REGIME --out DIR"
