"""``vlsi ablate``: the sub-tables' rows, run sharing, tables and charts, and a quick run."""

from __future__ import annotations

import json

import pytest

from vlsi.cli import main
from vlsi.demo.ablate import Row, subtables, summarize_row, table_chart, table_markdown
from vlsi.train.config import load_config


def test_subtables_cover_the_papers_rows():
    tables = subtables(5)
    assert [len(tables[k][1]) for k in "bdefg"] == [3, 8, 9, 8, 9]
    keys = [row.key for _, rows in tables.values() for row in rows]
    assert len(keys) == len(set(keys))
    # the default VLsI run appears in every sub-table and is trained once
    default = {row.run for _, rows in tables.values() for row in rows if not row.overrides}
    assert default == {"vlsi"}
    runs = {row.run for _, rows in tables.values() for row in rows}
    assert len(runs) == 1 + 7 + 8 + 7 + 8  # b reuses the default run, and so does g's off-policy forward KL
    e = {row.key: row for row in tables["e"][1]}
    assert e["e/bottom-3"].overrides == {"interaction.strategy": "bottom-k", "interaction.k": 3}
    assert e["e/normalized"].paper is None and e["e/vlsi"].paper == (86.3, 59.7, 75.8, 69.3)
    g = {row.key: row for row in tables["g"][1]}
    assert g["g/on0-forward"].run == "vlsi"
    assert g["g/on0.5-jsd"].overrides == {"interaction.on_policy": 0.5, "interaction.divergence": "jsd"}
    assert g["g/on1-reverse"].overrides == {"interaction.on_policy": 1.0, "interaction.divergence": "reverse"}


def test_every_row_is_a_valid_config(tmp_path):
    from vlsi.demo.pipeline import run_config
    from vlsi.demo.recipe import DemoRecipe

    import yaml

    cfg_file = tmp_path / "vlsi.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(DemoRecipe(), tmp_path, tmp_path, tmp_path, tmp_path, 0)))
    for _, rows in subtables(5).values():
        for row in rows:
            cfg = load_config(cfg_file, row.overrides)  # raises on an unknown key or value
            for key, value in row.overrides.items():
                part, name = key.split(".")
                assert getattr(getattr(cfg, part), name) == value, key


def test_table_and_chart_show_every_row():
    rows = [Row("x/a", "first", paper=(1.0, 2.0, 3.0, 4.0)), Row("x/b", "second")]
    summary = {"x/a": summarize_row([{"accuracy": 0.5, "interact_seconds_per_step": 1.0},
                                     {"accuracy": 0.7, "interact_seconds_per_step": 2.0}]),
               "x/b": summarize_row([{"accuracy": 0.25}])}
    md = table_markdown("T", rows, summary)
    assert "| first | 60.0 ± 14.1 | 50.0, 70.0 | 1.50 | 1.0 | 2.0 | 3.0 | 4.0 |" in md
    assert "| second | 25.0 ± 0.0 | 25.0 | — | — | — | — | — |" in md
    svg = table_chart("T", rows, summary)
    assert svg.startswith("<svg") and "first" in svg and "paper MMB 1.0" in svg and "not in the paper" in svg


@pytest.mark.slow
def test_quick_ablation_of_the_sft_step(tmp_path):
    out = tmp_path / "ablate"
    assert main(["ablate", "--quick", "--only", "b", "--seeds", "1", "--out", str(out)]) == 0
    result = json.loads((out / "ablation.json").read_text())
    rows = result["tables"]["b"]["rows"]
    assert [r["key"] for r in rows] == ["b/no-sft", "b/no-sft-beam", "b/sft"]
    assert all(0.0 <= r["mean"] <= 1.0 and len(r["per_seed"]) == 1 for r in rows)
    assert (out / "table4b.svg").is_file() and "Use of the SFT step" in (out / "ablation.md").read_text()
    # all three rows come from one run
    assert [p.name for p in (out / "runs").iterdir()] == ["vlsi"]
    # a rerun reuses every row
    assert main(["ablate", "--quick", "--only", "b", "--seeds", "1", "--out", str(out)]) == 0


def test_interaction_seconds_per_step_is_read_from_the_trainer_log(tmp_path):
    from vlsi.demo.ablate import interact_seconds_per_step

    assert interact_seconds_per_step(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 4, "train_runtime": 10.0}\n')
    assert interact_seconds_per_step(tmp_path) == 2.5
