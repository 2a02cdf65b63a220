"""The files under examples/ run as the README shows them."""

from __future__ import annotations

import importlib.util
import math
import re
import tempfile

from helpers import REPO
from vlsi.cli import main as vlsi_main
from vlsi.data.check import check_data, check_structure

EXAMPLES = REPO / "examples"
RECORD = EXAMPLES / "sample_record.json"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_in_code_runs_and_matches_in_order(capsys):
    script = _load_script("method_in_code")
    out = script.main()
    printed = capsys.readouterr().out
    assert "matched (student layer, teacher layer):" in printed
    # Algorithm 1: one teacher layer per student layer, deeper for each later student layer
    assert [s for s, _ in out["pairs"]] == script.STUDENT_LAYERS
    teacher_layers = [t for _, t in out["pairs"]]
    assert teacher_layers == sorted(set(teacher_layers))
    assert out["weights"].sum(dim=1).tolist() == [1.0] * len(script.STUDENT_LAYERS)
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    assert out["lora_grads"] > 0  # the loss reached the student's LoRA weights


def test_sample_record_passes_data_check(tiny_pair, capsys):
    structure = check_structure(RECORD)
    assert (structure["records"], structure["kept"], structure["skipped"]) == (1, 1, 0)
    assert structure["single_image"] == 1 and structure["multi_turn"] == 1

    report = check_data(RECORD, tiny_pair("qwen2_vl").student, strict=True)
    assert (report["kept"], report["skipped"], report["replies"]) == (1, 0, 2)
    assert report["supervised"]["min"] > 0

    # the command as the README writes it
    assert vlsi_main(["data", "check", str(RECORD)]) == 0
    assert "kept: 1  skipped: 0" in capsys.readouterr().out


def test_readme_method_in_code_block_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The method in code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(REPO)  # the block reads examples/sample_record.json
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace: dict = {"__name__": "readme_block"}
    exec(compile(code, "README.md (The method in code)", "exec"), namespace)
    weights = namespace["result"].weights
    assert weights.shape == (3, 7) and weights.sum(dim=1).tolist() == [1.0, 1.0, 1.0]
    columns = weights.argmax(dim=1).tolist()
    assert columns == sorted(set(columns))  # order preserved
    assert "tensor(" in capsys.readouterr().out


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_method_doc_name_existing_sections():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", (REPO / "docs" / "method.md").read_text(), re.M)}
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "src").rglob("*.py"),
             *(REPO / "configs").glob("*.yaml")]
    cited = {(f.name, a) for f in files for a in re.findall(r"method\.md#([\w\-]+)", f.read_text())}
    assert cited, "nothing links docs/method.md"
    assert not [(name, a) for name, a in cited if a not in anchors]
