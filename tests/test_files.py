"""``vlsi.files``: atomic writes and the JSONL helpers that resume relies on."""

from __future__ import annotations

import json

from vlsi.files import read_jsonl, truncate_jsonl, write_json_atomic


def test_atomic_write_creates_the_directory_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "results" / "b" / "seed-0.json"
    write_json_atomic(target, {"accuracy": 0.5})
    write_json_atomic(target, {"accuracy": 0.75})
    assert json.loads(target.read_text()) == {"accuracy": 0.75}
    assert [p.name for p in target.parent.iterdir()] == ["seed-0.json"]


def test_jsonl_lines_cut_by_a_kill_are_dropped_and_truncation_keeps_earlier_steps(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}, {"step": 3}]
    truncate_jsonl(log, 2)
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
