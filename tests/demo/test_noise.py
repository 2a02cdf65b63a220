"""Label noise of the demo's distillation data (vlsi.demo.noise)."""

from __future__ import annotations

import json
import random

import pytest

from vlsi.demo.noise import with_label_noise, wrong_answer
from vlsi.demo.pipeline import distillation_data
from vlsi.errors import VlsiError


def _record(i: int, answer: str, unordered: bool = False) -> dict:
    record = {"id": f"r{i}", "answer": answer, "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": answer}]}
    return {**record, "unordered": True} if unordered else record


def test_a_weaker_annotator_misses_one_item_or_miscounts_by_one():
    rng = random.Random(0)
    for _ in range(50):
        wrong = wrong_answer(_record(0, "red circle, blue square, red circle", True), rng)
        items = wrong.split(", ")
        assert len(items) == 2 and set(items) <= {"red circle", "blue square"}
        assert abs(int(wrong_answer(_record(0, "3"), rng)) - 3) == 1
    assert wrong_answer(_record(0, "0"), rng) == "1"  # no negative count
    assert wrong_answer(_record(0, "red circle", True), rng) is None  # nothing to miss
    assert wrong_answer(_record(0, "left"), rng) is None


def test_the_stated_share_is_wrong_and_the_rest_untouched():
    records = [_record(i, "circle, square, diamond", True) if i % 2 else _record(i, str(i % 5))
               for i in range(200)]
    noisy, changed = with_label_noise(records, 0.3, seed=1)
    assert len(changed) == 60 and len(noisy) == 200
    for before, after in zip(records, noisy):
        if after["id"] in changed:
            assert after["answer"] != before["answer"] and after["label_noise"]
            assert after["conversations"][-1]["value"] == after["answer"]
        else:
            assert after == before
    assert with_label_noise(records, 0.3, seed=1) == (noisy, changed)  # deterministic
    assert with_label_noise(records, 0.3, seed=2)[1] != changed
    assert records[1]["answer"] == "circle, square, diamond"  # the input is not modified


def test_too_few_records_that_can_be_wrong_is_refused():
    records = [_record(i, "circle", True) for i in range(10)] + [_record(10, "2")]
    with pytest.raises(VlsiError, match="needs 3 wrong answers, but only 1 of 11"):
        with_label_noise(records, 0.3)
    with pytest.raises(VlsiError, match=r"share in \[0, 1\]"):
        with_label_noise(records, 1.5)


def test_distillation_file_with_noise_is_written_once_beside_its_record(tmp_path):
    records = [_record(i, str(i % 4 + 1)) for i in range(40)]
    (tmp_path / "train.json").write_text(json.dumps(records))
    path = distillation_data(tmp_path, 20, 0.5)
    assert path.name == "distill-20-noise-0.5.json"
    noisy = json.loads(path.read_text())
    log = json.loads((tmp_path / "distill-20-noise-0.5.noise.json").read_text())
    assert len(noisy) == 20 and len(log["changed"]) == 10 and log["share"] == 0.5
    assert sum(r["answer"] != o["answer"] for r, o in zip(noisy, records)) == 10
    assert distillation_data(tmp_path, 20) == tmp_path / "distill-20.json"
    assert distillation_data(tmp_path, None) == tmp_path / "train.json"
